"""`relay launch`: torchrun's interface for a script, on emulated devices.

    relay launch --chip h100 --devices 8 --domain 4 train.py --lr 0.1
    relay launch --chip h100 --devices 8 -m torchtitan.train --job.config_file llama3_8b.toml

Every device runs the script (or module, with -m) unmodified as `__main__` with torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...); its
init_process_group, whatever backend it names, starts the `relay` backend. Results (per-device
emulated time, throughput if the script calls relay.dist.report, a Perfetto trace) go to
results/<name>/, each device's output to results/<name>/logs/rank<N>.log; the console shows
rank 0's as it comes, prefixed `[rank 0]` (--ranks chooses others, as torchrun's
--local-ranks-filter does). Each optimizer.step() marks a step: steps.csv (device/backend/steps.py).
A failed run adds error.txt: each failed device's last output and traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
from pathlib import Path

from tabulate import tabulate

from relay import Cluster
from relay.device.backend.collective import algorithms
from relay.device.backend.program import Program
from relay.driver.launch_shared import check, connect
from relay.driver.monitor import DeviceError
from relay.driver.programs import launch
from relay.errors import ConfigError
from relay.kernels.fusion import MODES as FUSIONS
from relay.launch.options import add_run_args, add_system_args, system_from, vars_of
from relay.results.folder import ResultsDir, environment, fmt, system_dict
from relay.results.write import write_launch


def parse_algorithm(text: str | None):
    """'ring' (every primitive it implements) or 'all_reduce=ring,all_to_all=hierarchical'."""
    if not text:
        return None
    if "=" not in text:
        return text
    out = {}
    for part in text.split(","):
        k, eq, v = part.partition("=")
        if not eq:
            raise ConfigError(f"--algorithm: {part!r} is not primitive=algorithm; e.g. all_reduce=ring")
        out[k.strip()] = v.strip()
    return out


def parse_ranks(text: str | None, devices: int) -> list[int]:
    """--ranks: '0' (the default), '0,3', '0-3', 'all' or 'none'."""
    text = (text or "0").strip()
    if text in ("all", "none"):
        return list(range(devices)) if text == "all" else []
    ranks = set()
    try:
        for part in text.split(","):
            first, dash, last = part.partition("-")
            ranks.update(range(int(first), int(last if dash else first) + 1))
    except ValueError:
        raise ConfigError(f"ranks = {text!r} is not a list of ranks; write e.g. 0, 0,3, 0-3, all or none") from None
    if not ranks or min(ranks) < 0 or max(ranks) >= devices:
        raise ConfigError(f"ranks = {text!r} names a rank outside 0..{devices - 1}; give ranks of the "
                          f"{devices} device(s), or all")
    return sorted(ranks)


def check_module(name: str) -> None:
    """-m NAME must be importable from here, as `python -m` would look for it."""
    sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is not there, or an empty name
        found = False
    finally:
        sys.path.pop(0)
    if not found:
        raise ConfigError(f"module = {name!r} is not importable from {os.getcwd()}; give a module on the "
                          "Python path (as for python -m), or a script's path without -m")


class Tail:
    """The chosen ranks' logs, shown as they grow: each new whole line once, prefixed
    `[rank N]` (on_poll of the run; close() shows what is left)."""

    def __init__(self, folder: Path, ranks: list[int]):
        self.folder, self.ranks = folder, ranks
        self.read = dict.fromkeys(ranks, 0)  # bytes of each log shown so far

    def poll(self, final: bool = False) -> None:
        for r in self.ranks:
            try:
                with open(self.folder / f"rank{r}.log", "rb") as f:
                    f.seek(self.read[r])
                    data = f.read()
            except FileNotFoundError:  # not started yet
                continue
            if not final:
                data = data[:data.rfind(b"\n") + 1]  # a line still being written waits
            self.read[r] += len(data)
            for line in data.decode("utf-8", "replace").splitlines():
                print(f"[rank {r}] {line}", flush=True)

    def close(self) -> None:
        self.poll(final=True)


def cmd_launch(args) -> int:
    system = system_from(args)
    if args.module:
        check_module(args.script)
    elif not os.path.isfile(args.script):
        raise ConfigError(f"script = {args.script!r} is not a file; give the path of a Python script "
                          "(or a module's name with -m)")
    ranks = parse_ranks(args.ranks, system.devices)
    algorithm = parse_algorithm(args.algorithm)
    algorithms(algorithm)  # an unknown algorithm is refused before any device starts
    clock = args.clock or "virtual"
    if args.tensors == "fake" and clock != "virtual":
        raise ConfigError("--tensors fake needs the virtual clock (fake tensors take no real time); drop --clock wall")
    if args.parallel and not args.shared:
        raise ConfigError(f"--parallel {args.parallel} is a hint for shared runs only; add --shared")
    cluster = Cluster(system, clock=clock, dilation=args.dilation, address=args.address,
                      timeout_s=args.timeout_s or 60.0, efficiency={"fusion": args.fusion})
    if args.shared:
        check(cluster, Program(script=args.script), args.tensors, args.parallel)  # before anything starts
    stem = args.script if args.module else os.path.splitext(os.path.basename(args.script))[0]
    out = ResultsDir(args.out or "results", args.name or f"launch-{stem}-{system.chip.name}x{system.devices}")
    logs = (out.path / "logs").resolve()
    logs.mkdir(exist_ok=True)
    program = Program(script=args.script if args.module else os.path.abspath(args.script),
                      argv=tuple(args.script_args), algorithm=algorithm, module=args.module,
                      log_dir=str(logs), cwd=os.getcwd(), host_clock=args.host_clock)
    tail = None
    try:
        # started (a shared run starts its own workers): an earlier run's logs by this name go only
        # now (a refused run keeps them)
        with contextlib.closing(connect(cluster)) if args.shared else cluster:
            for stale in [*logs.glob("rank*.log"), out.path / "error.txt"]:
                stale.unlink(missing_ok=True)
            tail = Tail(logs, ranks)
            res = launch(cluster, program, on_poll=tail.poll, tensors=args.tensors, shared=args.shared,
                         plan=args.parallel)
        for d in res.per_device:  # devices on other nodes sent their output back
            if d["output"] is not None:
                (logs / f"rank{d['device']}.log").write_text(d["output"])
    except DeviceError as e:
        for d, text in e.logs.items():  # failed devices on other nodes sent their output back
            (logs / f"rank{d}.log").write_text(text)
        error = out.write_text("error.txt", e.report())
        # (as BaseException.add_note does from Python 3.11; the cli prints the notes)
        e.__notes__ = [*getattr(e, "__notes__", []), f"each failed device's last output and traceback: {error}; "
                       f"every device's output: {out.path / 'logs'}/"]
        raise
    finally:
        if tail is not None:
            tail.close()
    config = {"command": "launch", "options": vars_of(args), "launch": res.config,
              "system": system_dict(system), **environment(cluster.host)}
    summary = write_launch(out, config, res)["summary"]
    shared = f", shared: {res.config['roles']} device(s) ran, every device replayed" if args.shared else ""
    print(f"# relay launch: {args.script} on {system.describe()}, {clock} clock, {args.tensors} tensors"
          f"{shared}, {args.fusion} kernels")
    rows = [[d["device"], fmt(d["emulated_s"], 1e3), fmt(d["compute_s"], 1e3), fmt(d["comm_s"], 1e3),
             fmt(d["exposed_comm_s"], 1e3), f"{d['real_s']:.2f}"] for d in res.per_device]
    print(tabulate(rows, headers=["device", "time (emulated ms)", "compute (emulated ms)",
                                  "communication (emulated ms)", "exposed comm (emulated ms)", "host (real s)"],
                   disable_numparse=True))
    print_steps(res.steps())
    for k in ("tokens", "samples"):
        if summary[f"{k}_per_s"]:
            print(f"throughput: {fmt(summary[f'{k}_per_s'])} {k} per emulated s")
    if clock == "wall":
        print(f"wall-clock fidelity: {summary['fidelity']:.3f} (1.0: every device kept to the emulated schedule; "
              f"below, the host fell behind at dilation {res.config['dilation']:.3g}: raise --dilation)")
    print(f"# results: {out.path} (trace.json opens in Perfetto; each device's output in logs/)")
    return 0


SHOWN_STEPS = 12  # a longer run prints its first and last steps; steps.csv holds them all


def print_steps(steps: list[dict]) -> None:
    """The program's steps (one per optimizer.step(), over all devices), or why there are none."""
    if not steps:
        print("steps: none (the program stepped no torch.optim optimizer); the totals above cover it all")
        return
    shown = steps if len(steps) <= SHOWN_STEPS else steps[:SHOWN_STEPS - 3] + [None] + steps[-3:]
    known = {k: any(s[k] is not None for s in steps) for k in ("samples", "tokens")}
    rows = [["..."] * 7 if s is None else
            [s["step"], fmt(s["step_s"], 1e3), fmt(s["compute_s"], 1e3), fmt(s["exposed_comm_s"], 1e3),
             fmt(s["samples_per_s"]), fmt(s["tokens_per_s"]), fmt(s["model_state_bytes"], 2 ** -20)]
            for s in shown]
    print(f"# {len(steps)} steps (each ends at an optimizer.step(); step 0 includes the set-up), all devices:")
    print(tabulate(rows, headers=["step", "step (emulated ms)", "compute (emulated ms, mean)",
                                  "exposed comm (emulated ms, mean)", "samples per emulated s",
                                  "tokens per emulated s", "model state (MiB, largest device)"],
                   disable_numparse=True))
    missing = [k for k, v in known.items() if not v]
    if missing:
        print(f"({' and '.join(missing)} per emulated s: not known, the program reported none; call "
              f"relay.dist.report({', '.join(k + '=...' for k in missing)}) each step to have them)")


def add_parser(sub) -> None:
    p = sub.add_parser("launch", help="run a torch.distributed script on the emulated devices (torchrun's interface)")
    add_system_args(p)
    add_run_args(p)
    p.add_argument("--algorithm", help="collective algorithms: one name (e.g. ring), or primitive=algorithm pairs "
                   "(e.g. all_reduce=halving_doubling,all_to_all=hierarchical); default auto (the vendor "
                   "library's choice, per operation and size)")
    p.add_argument("--timeout-s", type=float, help="seconds a device may wait for another (default 60)")
    p.add_argument("--name", help="results folder name (results/<name>/)")
    p.add_argument("--out", help="results root (default: results)")
    p.add_argument("--ranks", "--local-ranks-filter", dest="ranks",
                   help="ranks whose output the console shows, prefixed [rank N]: e.g. 0 (default), 0,3, "
                   "0-3, all or none; every rank's output is kept in results/<name>/logs/rank<N>.log")
    p.add_argument("--tensors", choices=("real", "fake"), default="real",
                   help="real (default) or fake: the program's tensors are fake tensors (shapes only), so "
                   "full-size models run; a value read from one (.item(), a printed loss) is 0")
    p.add_argument("--shared", action="store_true",
                   help="with --tensors fake, for a program whose every rank does the same work (data parallel, "
                   "FSDP): rank 0 runs alone and every device is replayed from it (one device's host time; "
                   "each device's emulated figures equal a launch of one process per device)")
    p.add_argument("--parallel", help="with --shared, the plan the program's process groups follow "
                   "(e.g. dp=4,tp=2; default: every device a data-parallel replica, groups of the whole world)")
    p.add_argument("--fusion", choices=FUSIONS, default="eager",
                   help="how the program's ops are charged: eager (default; a kernel per aten op, as eager PyTorch "
                   "launches them) or fused (Relay's fused chains of memory-bound ops, kernels/fusion.py: what "
                   "torch.compile would fuse, for a program that compiles; it still runs eagerly)")
    p.add_argument("--host-clock", action="store_true",
                   help="the program's time.perf_counter / monotonic / time read the host's clock (default: "
                   "the device's emulated clock, so its own throughput lines print emulated figures)")
    p.add_argument("-m", "--module", action="store_true",
                   help="the script is a module's name, run as `python -m` runs it (e.g. -m torchtitan.train)")
    p.add_argument("script", help="the Python script every device runs (with -m: a module's name)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own arguments")
    p.set_defaults(fn=cmd_launch)
