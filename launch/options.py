"""What the experiment commands share: parsing the options into a System, a TrainConfig and
Faults, the option groups themselves (training options come from TrainConfig's fields and their
documentation), and small helpers. Bad input raises UsageError (exit 2, one line)."""

from __future__ import annotations

import argparse
import re
import sys
import typing
from dataclasses import replace
from pathlib import Path

import psutil
from tqdm import tqdm

from relay import Faults, System, TrainConfig
from relay.errors import ConfigError
from relay.launch import presets

OTHER_DEFAULTS = {"clock": "virtual", "out": "results"}  # the training options' live in TrainConfig
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


class UsageError(ConfigError):
    """Bad command-line usage (options missing or contradicting each other)."""


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UsageError(f"size = {text!r} is not a byte count; write e.g. 8, 64K, 16M or 1G")
    return int(m.group(1)) * UNITS[m.group(2).upper()]


def fmt_bytes(n: int) -> str:
    for unit in ("G", "M", "K"):
        if n >= UNITS[unit] and n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]}{unit}"
    return str(n)


def system_from(args) -> System:
    """--system PRESET [--devices N] or --chip CHIP --devices N [--domain D], plus link overrides."""
    links = {k: getattr(args, k) for k in ("scaleup_gbps", "scaleup_latency_us", "scaleout_gbps",
                                           "scaleout_latency_us") if getattr(args, k, None) is not None}
    if getattr(args, "sharp", False):
        links["sharp"] = True
    if getattr(args, "system", None):
        if args.chip:
            raise UsageError("give --system or --chip, not both")
        s = System.preset(args.system)
        if args.devices:
            s = s.scaled(_count(args.devices))
        if args.domain or links:
            s = replace(s, domain=args.domain or s.domain, **links)
        return s
    devices = str(args.devices or "")
    if ":" in devices:  # a mixed system: --devices 910c:8,h100:2
        if args.chip:
            raise UsageError("--devices CHIP:N,... names the chips itself; drop --chip")
        groups = []
        for part in devices.split(","):
            chip, _, n = part.partition(":")
            if not n.strip().isdigit():
                raise UsageError(f"--devices = {devices!r}: write chip:count pairs, e.g. 910c:8,h100:2")
            groups.append((chip.strip(), int(n)))
        return System.mixed(groups, domain=args.domain, **links)
    if not args.chip:
        raise UsageError("say what to emulate: --system PRESET, or --chip CHIP --devices N")
    return System(args.chip, _count(devices) if devices else 1, domain=args.domain, **links)


def _count(text) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--devices = {text!r} is not a device count; give a number, or chip:count "
                         "pairs such as 910c:8,h100:2") from None


def add_system_args(p: argparse.ArgumentParser, devices_default=None) -> None:
    g = p.add_argument_group("what to emulate")
    g.add_argument("--system", help=f"system preset: {', '.join(System.presets())}")
    g.add_argument("--chip", help="chip from `relay chips` (with --devices)")
    g.add_argument("--devices", default=devices_default,
                   help="device count, or chip:count pairs for a mixed system (e.g. 910c:8,h100:2)")
    g.add_argument("--domain", type=int, help="devices per scale-up domain (default: one domain)")
    g.add_argument("--scaleup-gbps", type=float, help="override: scale-up GB/s per device per direction")
    g.add_argument("--scaleup-latency-us", type=float, help="override: scale-up latency per message, us")
    g.add_argument("--scaleout-gbps", type=float, help="override: scale-out GB/s per device per direction")
    g.add_argument("--scaleout-latency-us", type=float, help="override: scale-out latency per message, us")
    g.add_argument("--sharp", action="store_true",
                   help="the scale-out switches reduce (InfiniBand SHARP): enables the 'sharp' all-reduce")


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("how to run")
    g.add_argument("--clock", choices=("virtual", "wall"),
                   help="virtual: exact, deterministic emulated time; wall: paced real time")
    g.add_argument("--dilation", type=float, help="wall clock: real seconds per emulated second "
                   "(default: chosen from a host calibration)")
    g.add_argument("--address", help="Ray cluster to use: host:port, auto, or recorded (the one `relay cluster "
                   "up` started); default: an embedded local Ray for this command")


def add_preset_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"options from launch/presets/NAME.toml or a .toml path "
                   f"({', '.join(presets.names())})")


def add_train_args(p: argparse.ArgumentParser) -> None:
    """TrainConfig's options (all but the algorithm, which each command names its own way), with
    TrainConfig's documentation as their help; then the options of how a run is carried out."""
    g = p.add_argument_group("training")
    hints = typing.get_type_hints(TrainConfig)
    for f in TrainConfig.options():
        if f.name == "algorithm":
            continue
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            g.add_argument(f"--no-{f.name}", dest=f.name, action="store_false", default=None,
                           help=f"turn {f.name} off (on by default: {f.metadata['doc']})")
            continue
        typ = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        if typ not in (int, float, str):  # a structured value (--parallel dp=4,tp=2): TrainConfig parses the text
            typ = str
        default = "" if f.default is None else f" (default {f.default})"
        g.add_argument(flag, type=typ, help=f.metadata["doc"] + default)
    g.add_argument("--workload", help=TrainConfig.__dataclass_fields__["workload"].metadata["doc"] +
                   f" (default {TrainConfig.__dataclass_fields__['workload'].default})")
    g.add_argument("--max-real-devices", type=int, help="run at most this many real devices; larger "
                   "systems are predicted (default: what the host memory holds)")
    g.add_argument("--fail", help="inject a failure: device=K,step=S (device K's process dies at step S)")
    g.add_argument("--straggler", action="append", help="slow one device: device=K,slowdown=X[,links=Y] "
                   "(X on its compute, Y on its links; repeat for several)")
    g.add_argument("--timeout-s", type=float, help="seconds a device may wait for another before the run "
                   "fails (default 30)")
    g.add_argument("--name", help="results folder name (results/<name>/)")
    g.add_argument("--out", help="results root (default: results)")


def as_list(value, typ=str) -> list:
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    try:
        return [typ(v.strip() if isinstance(v, str) else v) for v in items if str(v).strip()]
    except ValueError:
        raise ConfigError(f"{value!r} is not a list of {typ.__name__}; write e.g. 1,2,4") from None


def _cwd_importable() -> None:
    """Let `--workload mymodule:attr` find modules in the current directory, as `python -m` would."""
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def config_from(args, **overrides) -> TrainConfig:
    """The TrainConfig of the command line (options left unset take TrainConfig's defaults)."""
    _cwd_importable()
    return TrainConfig.from_options(vars(args), **overrides)


def cluster_tensors(config: TrainConfig) -> str:
    """The `tensors` the command's Cluster is built with: its config's, so that a fake-tensor run
    of a full system starts one worker and runs shared, as Cluster(..., tensors="fake") does in
    Python (with "real", the Cluster would start one worker per device and refuse a system larger
    than the host). A fake run told --shared false needs one worker per device: "real" then."""
    return "fake" if config.fake and config.shared is not False else "real"


def other_defaults(args) -> None:
    """Fill the non-training options left unset (after any preset)."""
    for k, v in OTHER_DEFAULTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def capacity(memory_mb: float) -> int:
    """Devices this host's memory holds (each a torch process, ~175 MB unique, reserved at memory_mb)."""
    return max(1, int(psutil.virtual_memory().available * 0.8 // (memory_mb * 2**20)))


def progress(total: int, what: str):
    return tqdm(total=total, desc=what, unit="point", file=sys.stderr, leave=False, disable=None)


def faults_from(args, devices: int):
    """--fail device=K,step=S and --straggler device=K,slowdown=X[,links=Y] as Faults."""

    def fields(flag: str, text: str, allowed: set) -> dict:
        try:
            out = {k.strip(): float(v) for k, v in (kv.split("=") for kv in str(text).split(","))}
        except ValueError:
            raise ConfigError(f"{flag} = {text!r} is not key=value pairs; write e.g. "
                             f"{'device=2,step=3' if flag == '--fail' else 'device=2,slowdown=2'}") from None
        if not {"device"} <= set(out) <= allowed:
            raise ConfigError(f"{flag} = {text!r}: give device= and {' / '.join(sorted(allowed - {'device'}))}")
        return out

    fail, compute, links = None, {}, {}
    if getattr(args, "fail", None):
        f = fields("--fail", args.fail, {"device", "step"})
        if "step" not in f:
            raise ConfigError(f"--fail = {args.fail!r}: say when, e.g. device=2,step=3")
        fail = (int(f["device"]), int(f["step"]))
    for text in getattr(args, "straggler", None) or []:
        f = fields("--straggler", text, {"device", "slowdown", "links"})
        if "slowdown" in f:
            compute[int(f["device"])] = f["slowdown"]
        if "links" in f:
            links[int(f["device"])] = f["links"]
    faults = Faults(fail, compute, links)
    faults.check(devices)
    return faults


def vars_of(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "fn"}


