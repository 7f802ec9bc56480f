"""`relay breakeven`: how many slow devices match the fast system, and the findings in words."""

from __future__ import annotations

from types import SimpleNamespace

from tabulate import tabulate

from relay import Cluster, System, TrainConfig, chips
from relay.driver.experiment import breakeven, plan_counts, sweep
from relay.driver.sensitivity import full_scale, sensitivity
from relay.driver.session import MEMORY_MB
from relay.driver.training import check_memory
from relay.errors import ConfigError
from relay.hardware.system import PRESETS
from relay.launch import fullscale
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
from relay.launch.summary import summary_md
from relay.results.folder import ResultsDir, environment, fmt, system_dict
from relay.results.write import write_points
from relay.trainer import defaults as train_defaults


def breakeven_systems(args) -> tuple[System, System]:
    if not args.fast or not args.slow:
        raise UsageError("say what to compare: --fast SYSTEM (preset or chip) --slow CHIP (or preset)")
    fast = _system_or_chip(args.fast, args.fast_devices, "--fast")
    slow = _system_or_chip(args.slow, None, "--slow")
    return fast, slow


def _system_or_chip(name: str, devices: int | None, flag: str) -> System:
    if name in PRESETS:
        s = System.preset(name)
        return s.scaled(devices) if devices else s
    try:
        chips.get(name)
    except ValueError:
        raise ConfigError(f"{flag} = {name!r} is neither a system preset ({', '.join(PRESETS)}) nor a chip "
                         f"in the catalog (`relay chips` lists them)") from None
    if flag == "--fast" and not devices:
        raise ConfigError(f"--fast = {name!r} is a chip; say how many with --fast-devices N")
    # a bare chip: one scale-up domain of any size, the chip's own links
    return System(name, devices or 4096)


def cmd_breakeven(args) -> None:
    other_defaults(args)
    if fullscale.wanted(args):
        return fullscale.cmd_fullscale(args)
    args.algorithms = args.algorithms or train_defaults()["algorithm"]
    args.metric = args.metric or "throughput"
    fast, slow = breakeven_systems(args)
    algorithms = as_list(args.algorithms)
    if args.metric not in ("throughput", "time-to-loss"):
        raise ConfigError(f"metric = {args.metric!r} is unknown; choose throughput or time-to-loss")
    if args.metric == "time-to-loss" and args.target_loss is None:
        raise ConfigError("--metric time-to-loss needs --target-loss (the loss both sides must reach)")
    settings = config_from(args)
    if not settings.weak:
        raise ConfigError("break-even compares at a fixed per-device batch (weak scaling); drop --global-batch")
    settings = settings.replace(per_device_batch=settings.batch_for(1))
    for a in algorithms:
        settings.replace(algorithm=a)  # refuses an unknown algorithm
    check_memory(settings, fast, settings.per_device_batch)
    check_memory(settings, slow.scaled(1), settings.per_device_batch)
    capacity = min(host_capacity(MEMORY_MB), args.max_real_devices or 10**9)
    plan_counts(settings, fast.devices, capacity if settings.parallel is not None else None)  # before any device
    name = args.name or f"breakeven-{fast.name or fast.chip.name}-vs-{slow.chip.name}"
    out = ResultsDir(args.out, name)
    results, seen, extra = [], {}, {}
    faults = faults_from(args, 1)  # every break-even search starts from one device
    with Cluster(fast.scaled(min(fast.devices, capacity)), clock=args.clock, dilation=args.dilation,
                 address=args.address, faults=faults, timeout_s=args.timeout_s or 30.0,
                 tensors=cluster_tensors(settings)) as cluster:
        with progress(0, "break-even runs") as bar:
            def on_point(p, keep=True):
                bar.total += 1
                bar.update(1)
                if keep:
                    seen[(p.system, p.algorithm)] = p
            for a in algorithms:
                results.append(breakeven(cluster, fast, slow, a, settings, capacity, args.metric,
                                         args.target_loss, args.max_devices, on_point=on_point))
            curve = [slow.scaled(n) for n in as_list(args.curve, int)
                     if all((slow.scaled(n), a) not in seen for a in algorithms)]
            if curve:  # extra device counts, so that the plot shows the whole scaling curve
                sweep(cluster, curve, algorithms, settings, capacity, on_point=on_point)
            extra = _beyond_the_search(args, cluster, fast, slow, results, seen, settings, capacity,
                                       lambda p: on_point(p, keep=False))
        config = {"command": "breakeven", "options": vars_of(args), "training": settings.as_dict(),
                  "fast": system_dict(fast), "slow": system_dict(slow), "capacity": capacity,
                  **environment(cluster.host)}
    points = sorted(seen.values(), key=lambda p: (p.system.chip.name != slow.chip.name, p.algorithm, p.system.devices))
    rows = [r.row() for r in results]
    summary = write_points(out, "breakeven", config, points, {"breakeven": rows, "fast": system_dict(fast),
                                                               "slow": system_dict(slow), **extra})
    out.write_text("summary.md", summary_md(summary, settings))
    print(f"# relay breakeven: {settings.workload.name}, {fast.describe()} against {slow.chip.name}, {args.metric}")
    print(breakeven_table(rows))
    for r in rows:
        for line in checks(r):
            print(f"# {r['algorithm']}: {line}")
    if extra.get("sensitivity"):
        print(f"# sensitivity: {2 * len(extra['sensitivity']['rows'])} break-even searches "
              f"({extra['sensitivity']['algorithm']}) took {extra['sensitivity']['host_s']:.0f} s (host); "
              "see summary.md")
    print(f"# results: {out.path}")


def _beyond_the_search(args, cluster, fast, slow, results, seen, settings, capacity, on_point) -> dict:
    """The full systems predicted (when both sides are presets) and, with --sensitivity, the
    break-even's sensitivity to the uncertain model parameters (emulator/driver/sensitivity.py)."""
    reached = [r for r in results if r.devices]
    if not reached:
        return {}
    best = min(reached, key=lambda r: r.devices)  # the algorithm summary.md's finding names
    real = [p for (_, a), p in seen.items() if a == best.algorithm and not p.predicted]
    extra = {}
    if fast.name in PRESETS and slow.name in PRESETS and settings.parallel is None:  # (a plan's are not predicted)
        extra["full_scale"] = full_scale(System.preset(fast.name), System.preset(slow.name), real, settings)
    if getattr(args, "sensitivity", None):
        known = {p.system: p for p in real if p.system.chip == fast.chip}
        extra["sensitivity"] = sensitivity(cluster, fast, slow, best, settings, capacity, known,
                                           args.max_devices, on_point=on_point)
    return extra


def checks(row: dict) -> list[str]:
    """What the search checked about its own answer, in words."""
    out = []
    if row.get("below_devices") is not None:
        out.append(f"one device fewer ({row['below_devices']}) " +
                   ("falls short, as it must" if row["verified"]
                    else "ALSO REACHES the target: the answer is not the smallest"))
    if row.get("non_monotone"):
        out.append("NOT MONOTONE: more devices did worse at " +
                   ", ".join(f"{a} -> {b}" for a, b in row["non_monotone"]) + " devices")
    return out


def breakeven_table(rows: list[dict]) -> str:
    if not rows:
        return "(no results)"
    unit = rows[0]["energy_unit"]
    what = "emul tokens/s" if unit == "token" else "emul samples/s"
    if rows[0]["metric"] == "time-to-loss":
        what = "emul s to target loss"
    return tabulate([[r["algorithm"], r["fast"], fmt(r["fast_throughput"]), r["break_even_devices"] or "not reached",
                      fmt(r["slow_throughput"]), fmt(r["naive_devices"], digits=3),
                      fmt(r["scaling_efficiency"], 100), fmt(r["fast_energy_per_unit_j"]),
                      fmt(r["slow_energy_per_unit_j"]), fmt(r.get("verified")),
                      "predicted" if r["predicted"] else "emulated"]
                     for r in rows],
                    headers=["algorithm", "fast system", f"fast ({what})", "break-even slow devices",
                             f"slow at break-even ({what})", "naive (FLOPS ratio)", "scaling eff. (%)",
                             f"fast J/{unit} (emul, {rows[0].get('fast_power_basis') or 'chip'} power)",
                             f"slow J/{unit} (emul, {rows[0].get('slow_power_basis') or 'chip'} power)",
                             "one fewer falls short", "how"], disable_numparse=True)


def _settings_of(config: dict):
    """The TrainConfig a results folder was made with, from its config.json."""
    o = {**config["options"], **config.get("training", {})}
    try:
        settings = TrainConfig.from_options(o)
    except ValueError:  # a user's workload that is not importable here: its name is enough
        wl = SimpleNamespace(name=o["workload"], tokens_per_sample=None)
        return SimpleNamespace(workload=wl, steps=o["steps"], per_device_batch=o["per_device_batch"],
                               batch_scale=o["batch_scale"] or 1)
    return settings.replace(per_device_batch=settings.batch_for(1))
