"""`relay sweep`: one workload over device counts x chips (or systems) x algorithms, resumable."""

from __future__ import annotations

import csv
import sys

from tabulate import tabulate

from relay import Cluster, System
from relay.driver.experiment import sweep
from relay.driver.session import MEMORY_MB
from relay.driver.training import check_memory
from relay.errors import ConfigError
from relay.launch.options import (
    UsageError,
    as_list,
    cluster_tensors,
    config_from,
    faults_from,
    other_defaults,
    progress,
    vars_of,
)
from relay.launch.options import capacity as host_capacity
from relay.results.folder import ResultsDir, environment, fmt, system_dict
from relay.results.write import write_points
from relay.trainer import defaults as train_defaults


def sweep_systems(args) -> list[System]:
    counts = as_list(args.devices, int)
    if not counts or any(n < 1 for n in counts):
        raise UsageError(f"--devices = {args.devices!r}: give device counts >= 1, e.g. 1,2,4,8")
    systems = as_list(args.systems)
    chips = as_list(args.chips)
    if bool(systems) == bool(chips):
        raise UsageError("say what to sweep: --systems PRESET[,PRESET...] or --chips CHIP[,CHIP...]")
    if systems:
        return [System.preset(s).scaled(n) for s in systems for n in counts]
    return [System(c, n, domain=min(args.domain, n) if args.domain else None) for c in chips for n in counts]


SWEEP_IDENTITY = ("workload", "steps", "per_device_batch", "global_batch", "batch_scale", "seed", "overlap",
                  "lr", "bucket_mb", "warmup", "parallel", "clock", "scaling", "algorithms", "fail", "straggler")


def _resume(out: ResultsDir, args) -> tuple[dict, list[dict]]:
    """Points an earlier, interrupted run of the same sweep ran, and their step rows."""
    if not (out.path / "summary.json").exists():
        return {}, []
    summary, config = out.read_json("summary.json"), out.read_json("config.json")
    if summary.get("kind") != "sweep":
        raise ConfigError(f"results folder {str(out.path)!r} holds a {summary.get('kind')}, not a sweep; "
                         "choose another --name")
    before = config.get("options", {})
    changed = [k for k in SWEEP_IDENTITY if str(before.get(k)) != str(getattr(args, k, None))]
    if changed:
        raise ConfigError(f"results folder {str(out.path)!r} holds a sweep with other settings ({', '.join(changed)}); "
                         "choose another --name to keep both, or delete the folder")
    done = {(r["system"], r["chip"], r["devices"], r["algorithm"]): r for r in summary["points"]}
    with open(out.path / "steps.csv") as fh:
        steps = [r for r in csv.DictReader(fh)]
    return done, steps


def cmd_sweep(args) -> None:
    other_defaults(args)
    args.algorithms = args.algorithms or train_defaults()["algorithm"]
    args.scaling = args.scaling or "weak"
    if args.scaling not in ("weak", "strong"):
        raise ConfigError(f"scaling = {args.scaling!r} is unknown; choose 'weak' or 'strong'")
    if args.scaling == "strong" and args.global_batch is None:
        raise ConfigError("strong scaling needs --global-batch (the batch divided over the devices)")
    if args.scaling == "weak" and args.global_batch is not None:
        raise ConfigError("weak scaling fixes --per-device-batch; for a fixed --global-batch use --scaling strong")
    systems = sweep_systems(args)
    algorithms = as_list(args.algorithms)
    config = config_from(args)
    for a in algorithms:
        config.replace(algorithm=a)  # refuses an unknown algorithm
    for s in systems:
        check_memory(config, s, config.batch_for(s.devices))
        if config.parallel is not None:  # each point's plan: dp = devices / (tp x pp)
            plan = config.parallel.fill(s.devices)
            plan.check(s.devices, s.domain, config.workload.config, config.batch_for(plan.dp))
    capacity = min(host_capacity(MEMORY_MB), args.max_real_devices or 10**9)
    if config.parallel is not None and max(s.devices for s in systems) > capacity:
        raise ConfigError(f"sweep --parallel: {max(s.devices for s in systems)} devices is more than this host runs "
                          f"({capacity}), and predicting a plan's point is not done; sweep fewer devices")
    name = args.name or f"sweep-{config.workload.name}"
    out = ResultsDir(args.out, name)
    done, earlier = _resume(out, args)
    if done:
        print(f"# resuming {out.path}: {len(done)} point(s) already run, skipped", file=sys.stderr)
    first = min(systems, key=lambda s: s.devices)
    faults = faults_from(args, first.devices)  # a fault must name a device of every point
    with Cluster(first.scaled(min(max(s.devices for s in systems), capacity)), clock=args.clock,
                 dilation=args.dilation, address=args.address, faults=faults,
                 timeout_s=args.timeout_s or 30.0, tensors=cluster_tensors(config)) as cluster:
        record = {"command": "sweep", "options": vars_of(args), "training": config.as_dict(),
                  "scaling": args.scaling, "systems": [system_dict(s) for s in systems],
                  **environment(cluster.host)}
        measured = []

        def save(point):  # after every point, so that an interrupted sweep loses nothing
            measured.append(point)
            write_points(out, "sweep", record, measured, {"status": "partial"}, plots=False,
                         earlier_steps=earlier)

        with progress(len(systems) * len(algorithms), "sweep") as bar:
            points = sweep(cluster, systems, algorithms, config, capacity, progress=bar, on_point=save,
                           done=done)
    write_points(out, "sweep", record, points, {"status": "complete"}, earlier_steps=earlier)
    plan = f", parallel {config.parallel} with dp = devices / (tp x pp)" if config.parallel is not None else ""
    print(f"# relay sweep: {config.workload.name}, {args.scaling} scaling{plan}, {args.clock} clock")
    print(points_table([p.row for p in points]))
    print(f"# results: {out.path}")


def points_table(rows: list[dict]) -> str:
    unit = "tokens" if any(r.get("tokens_per_s") for r in rows) else "samples"
    return tabulate([[r["chip"], r["devices"], r["algorithm"], r["global_batch"], fmt(r["step_s"], 1e3),
                      fmt(r["compute_s"], 1e3), fmt(r["exposed_comm_s"], 1e3),
                      fmt(r.get("tokens_per_s") or r["samples_per_s"]), fmt(r["mfu"], 100),
                      fmt(r.get("energy_per_token_j") or r.get("energy_per_sample_j")), r.get("power_basis", "chip"),
                      "predicted" if r["predicted"] else "emulated"] for r in rows],
                    headers=["chip", "devices", "algorithm", "global batch", "emul step (ms)",
                             "emul compute (ms)", "emul exposed comm (ms)", f"emul {unit}/s", "MFU (%)",
                             f"emul J/{unit[:-1]}", "power basis", "how"], disable_numparse=True)


