"""`relay run`: one training run, its summary table and its results folder."""

from __future__ import annotations

import sys

from tabulate import tabulate

from relay import Cluster, DeviceError
from relay.launch.options import cluster_tensors, config_from, faults_from, other_defaults, system_from, vars_of
from relay.results.folder import ResultsDir, environment, fmt, system_dict
from relay.results.write import write_run
from relay.trainer import defaults as train_defaults


def cmd_run(args) -> int:
    other_defaults(args)
    system = system_from(args)
    config = config_from(args, algorithm=args.algorithm or train_defaults()["algorithm"])
    cluster = Cluster(system, clock=args.clock, dilation=args.dilation, address=args.address,
                      faults=faults_from(args, system.devices), timeout_s=args.timeout_s or 30.0,
                      tensors=cluster_tensors(config), dtype=args.precision or "bf16")
    checked = cluster.preflight(config)  # every check that needs no device, once, before any starts
    name = args.name or f"run-{config.workload.name}-{system.chip.name}x{system.devices}"
    out = ResultsDir(args.out, name)
    try:
        with cluster:
            res = cluster.train(config, preflight=checked)
    except DeviceError as e:
        if e.completed is None:
            raise
        record = {"command": "run", "options": vars_of(args), "training": e.completed.config,
                  "system": system_dict(system), "status": "failed", "error": str(e),
                  **environment(cluster.host)}
        write_run(out, record, e.completed, system)  # keep the steps that finished, and say so
        print(f"relay run: run failed: {e} ({e.step} completed step(s) kept in {out.path})", file=sys.stderr)
        return 1
    record = {"command": "run", "options": vars_of(args), "training": res.config,
              "system": system_dict(system), "status": "complete", **environment(cluster.host)}
    write_run(out, record, res, system, trace=args.trace)
    plan = f", parallel {config.parallel}" if config.parallel is not None else ""
    print(f"# relay run: {config.workload.name} on {system.describe()}{plan}, {config.algorithm}, "
          f"{args.precision or 'bf16'}, {args.clock} clock")
    print(tabulate(run_table(res.summary(), res.config), headers=["figure", "value", "unit"],
                   disable_numparse=True))
    print(f"# results: {out.path}" + (" (with trace.json for Perfetto)" if args.trace else ""))
    return 0


def run_table(s: dict, config: dict) -> list[list]:
    unit = "tokens" if s.get("tokens_per_s") else "samples"
    basis = config.get("power_basis", "chip")
    rows = [["step time", fmt(s["step_s"], 1e3), "emulated ms"],
            ["compute", fmt(s["compute_s"], 1e3), "emulated ms"],
            ["communication (total)", fmt(s["comm_s"], 1e3), "emulated ms"],
            ["communication (exposed)", fmt(s["exposed_comm_s"], 1e3), "emulated ms"],
            *([["pipeline wait (in other)", fmt(s["pipeline_wait_s"], 1e3), "emulated ms"]]
              if s.get("pipeline_wait_s") else []),
            ["throughput", fmt(s.get("tokens_per_s") or s["samples_per_s"]), f"{unit} per emulated s"],
            ["model FLOPs utilisation", fmt(s["mfu"], 100), "% of dense BF16 peak"],
            ["energy per step", fmt(s["energy_j"]), f"J (emulated, {basis} power)"],
            [f"energy per {unit[:-1]}", fmt(s.get("energy_per_token_j") or s.get("energy_per_sample_j")),
             f"J (emulated, {basis} power)"],
            ["final loss", fmt(s["final_loss"], digits=4), "nats" if config.get("loss_floor") else ""],
            ["host time per step", fmt(s["wall_s"]), "real s"],
            ["fidelity", fmt(s["fidelity"], digits=4), "wall clock: 1.0 = exact"]]
    if config.get("loss_floor") is not None:
        at = [r[0] for r in rows].index("final loss") + 1
        rows.insert(at, ["best achievable loss", fmt(config["loss_floor"], digits=4), "nats"])
    return rows


