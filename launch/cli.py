"""`relay`: the command line.

Every emulated figure is labelled as emulated and every host figure as real, with units in the
column names. Bad input exits with status 2 and a one-line message (no traceback)."""

from __future__ import annotations

import argparse
import json
import re
import sys

from tabulate import tabulate

from emulator import System, chips

UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


class UsageError(ValueError):
    pass


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
    if getattr(args, "system", None):
        if args.chip:
            raise UsageError("give --system or --chip, not both")
        s = System.preset(args.system)
        if args.devices:
            s = s.scaled(_count(args.devices))
        if args.domain or links:
            from dataclasses import replace
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


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("how to run")
    g.add_argument("--clock", choices=("virtual", "wall"),
                   help="virtual: exact, deterministic emulated time; wall: paced real time")
    g.add_argument("--dilation", type=float, help="wall clock: real seconds per emulated second "
                   "(default: chosen from a host calibration)")
    g.add_argument("--address", help="Ray cluster to use: host:port, auto, or recorded (the one `relay cluster "
                   "up` started); default: an embedded local Ray for this command")


# ---------------------------------------------------------------- relay chips
def cmd_chips(args) -> None:
    rows = [chips.get(n) for n in chips.names()]
    if args.json:
        print(json.dumps([c.as_dict() for c in rows], indent=2))
        return

    def v(c, f):
        x = getattr(c, f)
        return ("-" if f == "fp8_tflops" else "unknown") if x is None else \
            f"{x:g}" + (" (est.)" if c.is_estimate(f) else "")

    table = [[c.name, c.display, v(c, "bf16_tflops"), v(c, "fp8_tflops"), v(c, "hbm_gb"), v(c, "hbm_tbps"),
              v(c, "scaleup_gbps"), v(c, "scaleup_latency_us"), v(c, "scaleout_gbps"), v(c, "power_w")]
             for c in rows]
    print(tabulate(table, headers=["chip", "name", "BF16 TFLOPS", "FP8 TFLOPS", "HBM GB", "HBM TB/s",
                                   "scale-up GB/s", "scale-up us", "scale-out GB/s", "power W"]))
    print("\nGB/s are per device and direction; (est.) marks estimates or disputed figures.\nSources:")
    for c in rows:
        by_source = {}
        for f, src in c.sources.items():
            by_source.setdefault(src, []).append(f)
        print(f"  {c.name}:")
        for src, fs in by_source.items():
            print(f"    {', '.join(fs)}: {src}")
        if c.note:
            print(f"    note: {c.note}")


# ---------------------------------------------------------------- relay bench
def cmd_bench(args) -> None:
    from emulator.collectives import DTYPE_BYTES, busbw_factor, simulate
    from emulator.collectives.schedules import algorithms_for, check

    args.clock = args.clock or "virtual"
    system = system_from(args)
    if args.algorithm is None:
        args.algorithm = "direct" if args.primitive == "all_to_all" else "ring"
    algorithms = list(algorithms_for(args.primitive)) if args.algorithm == "all" else args.algorithm.split(",")
    for a in algorithms:
        check(args.primitive, a)
    if args.dtype not in DTYPE_BYTES:
        raise UsageError(f"--dtype = {args.dtype!r} is unknown; choose one of {', '.join(DTYPE_BYTES)}")
    lo, hi = parse_bytes(args.min_bytes), parse_bytes(args.max_bytes)
    if not 0 < lo <= hi:
        raise UsageError(f"--min-bytes {args.min_bytes} / --max-bytes {args.max_bytes}: need 0 < min <= max")
    if args.factor < 2:
        raise UsageError(f"--factor = {args.factor} is invalid; give an integer >= 2")
    elem, world = DTYPE_BYTES[args.dtype], system.devices
    unit = elem * (world if args.primitive in ("all_gather", "reduce_scatter", "all_to_all") else 1)
    sizes, n = [], lo
    while n <= hi:
        sizes.append(max(unit, n // unit * unit))
        n *= args.factor
    rows = []
    if args.executor == "local":
        for a in algorithms:
            for size in sizes:
                t = simulate(args.primitive, a, size, system, dtype=args.dtype)
                rows.append((size, a, t, None))
    else:
        from emulator import Cluster
        with Cluster(system, clock=args.clock, dilation=args.dilation, address=args.address) as cluster:
            for a in algorithms:
                per = world if args.primitive == "all_gather" else 1
                cases = [(size // elem // per, args.dtype) for size in sizes]
                for size, res in zip(sizes, cluster.collectives(args.primitive, cases, a, repeats=args.repeats)):
                    rows.append((size, a, res.emulated_s, res.real_s))
    out_rows = []
    for size, a, t, real in rows:
        algbw = size / t / 1e9 if t > 0 else float("inf")
        out_rows.append({"size_bytes": size, "count": size // elem, "dtype": args.dtype,
                         "primitive": args.primitive, "algorithm": a, "time_us": t * 1e6, "algbw_GBps": algbw,
                         "busbw_GBps": algbw * busbw_factor(args.primitive, world), "real_s": real})
    if args.json:
        print(json.dumps({"system": system.describe(), "clock": args.clock, "executor": args.executor,
                          "rows": out_rows}, indent=2))
        return
    print(f"# relay bench: {args.primitive} on {system.describe()}")
    print(f"# emulated figures ({args.clock} clock, {args.executor} executor); real_s is host wall time")
    print(tabulate([[fmt_bytes(r["size_bytes"]), r["count"], r["dtype"], r["algorithm"], f"{r['time_us']:.2f}",
                     f"{r['algbw_GBps']:.2f}", f"{r['busbw_GBps']:.2f}",
                     "-" if r["real_s"] is None else f"{r['real_s']:.4f}"] for r in out_rows],
                   headers=["size", "count", "type", "algorithm", "emul time (us)", "emul algbw (GB/s)",
                            "emul busbw (GB/s)", "real (s)"], disable_numparse=True))
    if args.name:
        from emulator.results import ResultsDir, environment, system_dict, write_bench
        from launch.experiments import vars_of
        out = ResultsDir(args.out or "results", args.name)
        write_bench(out, {"command": "bench", "options": vars_of(args),
                          "system": system_dict(system), **environment()}, out_rows, system, args.primitive)
        print(f"# results: {out.path} (busbw.png)")


# ---------------------------------------------------------------- relay demo
def cmd_demo(args) -> None:
    """`relay breakeven --preset demo`."""
    parser = build_parser()
    demo = parser.parse_args(["breakeven", "--preset", "demo"])
    with_preset(parser, demo)
    demo.fn(demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay", description="Emulate many accelerators with real processes.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("chips", help="the chip catalog, with sources")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_chips)

    b = sub.add_parser("bench", help="nccl-tests-style collective benchmark on emulated devices")
    add_system_args(b)
    add_run_args(b)
    b.add_argument("--primitive", default="all_reduce", help="all_reduce, reduce_scatter, all_gather, broadcast, "
                   "all_to_all (size: each device's input)")
    b.add_argument("--algorithm", help="ring, tree, halving_doubling, direct, hierarchical, a comma-separated "
                   "list, or all (default ring; direct for all_to_all, which has direct and hierarchical)")
    b.add_argument("--min-bytes", default="8", help="smallest buffer (e.g. 8, 1K)")
    b.add_argument("--max-bytes", default="64M", help="largest buffer (e.g. 64M)")
    b.add_argument("--factor", type=int, default=4, help="size step factor")
    b.add_argument("--dtype", default="float32")
    b.add_argument("--repeats", type=int, default=1)
    b.add_argument("--executor", choices=("actors", "local"), default="actors",
                   help="actors: real processes over gloo; local: the one-process executor (any size)")
    b.add_argument("--json", action="store_true")
    b.add_argument("--name", help="also write results/<name>/ (busbw.png, summary.json, ...)")
    b.add_argument("--out", help="results root (default: results)")
    b.set_defaults(fn=cmd_bench)

    from launch import experiments

    r = sub.add_parser("run", help="one training run: summary table and a results folder")
    add_preset_arg(r)
    add_system_args(r)
    add_train_args(r)
    add_run_args(r)
    r.add_argument("--algorithm", help="all-reduce algorithm for the gradients (default ring)")
    r.add_argument("--trace", action="store_true", default=None,
                   help="also write trace.json: a per-device timeline in emulated time (open in Perfetto)")
    r.set_defaults(fn=experiments.cmd_run)

    sw = sub.add_parser("sweep", help="one workload over device counts x chips (or systems) x algorithms")
    add_preset_arg(sw)
    g = sw.add_argument_group("what to sweep")
    g.add_argument("--devices", help="device counts, e.g. 1,2,4,8")
    g.add_argument("--chips", help="chips, e.g. h100,ascend-910c (one scale-up domain each)")
    g.add_argument("--systems", help="system presets, scaled to each device count")
    g.add_argument("--domain", type=int, help="with --chips: devices per scale-up domain")
    g.add_argument("--algorithms", help="all-reduce algorithms, e.g. ring,tree (default ring)")
    g.add_argument("--scaling", help="weak: fixed --per-device-batch (default); strong: fixed --global-batch")
    add_train_args(sw)
    add_run_args(sw)
    sw.set_defaults(fn=experiments.cmd_sweep)

    be = sub.add_parser("breakeven", help="how many slow devices match the fast system")
    add_preset_arg(be)
    g = be.add_argument_group("what to compare")
    g.add_argument("--fast", help="the fast side: a system preset (e.g. nvl72) or a chip with --fast-devices")
    g.add_argument("--fast-devices", type=int, help="scale the fast system to this many devices")
    g.add_argument("--slow", help="the slow side: a chip (one domain, its own links) or a system preset")
    g.add_argument("--algorithms", help="all-reduce algorithms to compare, e.g. ring,halving_doubling")
    g.add_argument("--metric", help="throughput (default) or time-to-loss")
    g.add_argument("--target-loss", type=float, help="with --metric time-to-loss: the loss to reach")
    g.add_argument("--max-devices", type=int, help="largest slow device count to search")
    g.add_argument("--curve", help="also run the slow side at these device counts (for the plot), e.g. 1,8,16,32")
    add_train_args(be)
    add_run_args(be)
    be.set_defaults(fn=experiments.cmd_breakeven)

    from launch import ray_cluster, script
    ray_cluster.add_parser(sub)
    script.add_parser(sub)

    rp = sub.add_parser("report", help="redraw the plots of a results folder and print its summary")
    rp.add_argument("path", help="results/<name>")
    rp.set_defaults(fn=experiments.cmd_report)

    d = sub.add_parser("demo", help="the headline experiment, small (about 3 minutes)")
    d.set_defaults(fn=cmd_demo)
    return p


def add_preset_arg(p: argparse.ArgumentParser) -> None:
    from launch import presets
    p.add_argument("--preset", help=f"options from launch/presets/NAME.toml or a .toml path "
                   f"({', '.join(presets.names())})")


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--workload", help="mlp, gpt-tiny, or package.module:attribute (default gpt-tiny)")
    g.add_argument("--steps", type=int, help="training steps per run")
    g.add_argument("--per-device-batch", type=int, help="samples per device per step (weak scaling; default 8)")
    g.add_argument("--global-batch", type=int, help="samples per step over all devices (strong scaling)")
    g.add_argument("--batch-scale", type=int, help="charge each device for this many times the batch it "
                   "computes (default 1)")
    g.add_argument("--seed", type=int)
    g.add_argument("--lr", type=float, help="learning rate (default: the workload's)")
    g.add_argument("--bucket-mb", type=float, help="gradient bucket size, MB at the emulated dtype")
    g.add_argument("--no-overlap", dest="overlap", action="store_false", default=None,
                   help="all-reduce gradients after backward instead of during it")
    g.add_argument("--max-real-devices", type=int, help="run at most this many real devices; larger "
                   "systems are predicted (default: what the host memory holds)")
    g.add_argument("--fail", help="inject a failure: device=K,step=S (device K's process dies at step S)")
    g.add_argument("--straggler", action="append", help="slow one device: device=K,slowdown=X[,links=Y] "
                   "(X on its compute, Y on its links; repeat for several)")
    g.add_argument("--timeout-s", type=float, help="seconds a device may wait for another before the run "
                   "fails (default 30)")
    g.add_argument("--name", help="results folder name (results/<name>/)")
    g.add_argument("--out", help="results root (default: results)")


def with_preset(parser: argparse.ArgumentParser, args) -> None:
    """Fill unset options from --preset (a command's own options only)."""
    if getattr(args, "preset", None):
        from launch import presets
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        valid = {a.dest for a in sub.choices[args.command]._actions} - {"help", "preset"}
        presets.apply(args, args.command, valid)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from emulator.monitor import DeviceError
    try:
        with_preset(parser, args)
        args.fn(args)
    except DeviceError as e:  # a device failed mid-run: not bad input, but no traceback either
        print(f"relay {args.command}: run failed: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"relay {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"relay {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        from emulator.results import ResultsDir
        ResultsDir.release_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
