"""`relay launch`: torchrun's interface for a script, on emulated devices.

    relay launch --chip h100 --devices 8 --domain 4 train.py --lr 0.1

Every device runs the script unmodified as `__main__` with torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...); its
init_process_group, whatever backend it names, starts the `relay` backend. Results (per-device
emulated time, throughput if the script calls emulator.dist.report, a Perfetto trace) go to
results/<name>/, and each optimizer.step() marks a step: steps.csv (device/steps.py).
"""

from __future__ import annotations

import argparse
import os

from tabulate import tabulate

from emulator import Cluster
from emulator.device.collective import algorithms
from emulator.device.program import Program
from emulator.driver.programs import launch
from emulator.errors import ConfigError
from emulator.results.folder import ResultsDir, environment, fmt, system_dict
from emulator.results.write import write_launch
from launch.options import add_run_args, add_system_args, system_from, vars_of


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


def cmd_launch(args) -> int:
    system = system_from(args)
    if not os.path.isfile(args.script):
        raise ConfigError(f"script = {args.script!r} is not a file; give the path of a Python script")
    algorithm = parse_algorithm(args.algorithm)
    algorithms(algorithm)  # an unknown algorithm is refused before any device starts
    clock = args.clock or "virtual"
    cluster = Cluster(system, clock=clock, dilation=args.dilation, address=args.address,
                      timeout_s=args.timeout_s or 60.0)
    stem = os.path.splitext(os.path.basename(args.script))[0]
    out = ResultsDir(args.out or "results", args.name or f"launch-{stem}-{system.chip.name}x{system.devices}")
    program = Program(script=os.path.abspath(args.script), argv=tuple(args.script_args), algorithm=algorithm)
    with cluster:
        res = launch(cluster, program)
    config = {"command": "launch", "options": vars_of(args), "launch": res.config,
              "system": system_dict(system), **environment(cluster.host)}
    summary = write_launch(out, config, res)["summary"]
    print(f"# relay launch: {args.script} on {system.describe()}, {clock} clock")
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
    print(f"# results: {out.path} (trace.json opens in Perfetto)")
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
              f"emulator.dist.report({', '.join(k + '=...' for k in missing)}) each step to have them)")


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
    p.add_argument("script", help="the Python script every device runs")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own arguments")
    p.set_defaults(fn=cmd_launch)
