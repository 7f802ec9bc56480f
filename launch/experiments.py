"""`relay run`, `relay sweep`, `relay breakeven`, `relay report`: experiments from the command line."""

from __future__ import annotations

import sys
from pathlib import Path

from tabulate import tabulate

from emulator import System
from emulator.cluster import MEMORY_MB
from emulator.results import ResultsDir, environment, fmt, system_dict
from emulator.errors import ConfigError
from launch.summary import summary_md

RUN_DEFAULTS = {"workload": "gpt-tiny", "steps": 10, "batch_scale": 1, "seed": 0, "clock": "virtual",
                "out": "results", "algorithm": "ring", "overlap": True}


def as_list(value, typ=str) -> list:
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    try:
        return [typ(v.strip() if isinstance(v, str) else v) for v in items if str(v).strip()]
    except ValueError:
        raise ConfigError(f"{value!r} is not a list of {typ.__name__}; write e.g. 1,2,4") from None


def defaults(args, extra: dict | None = None) -> None:
    for k, v in {**RUN_DEFAULTS, **(extra or {})}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def settings_from(args, workload):
    from emulator.experiment import Settings
    if args.per_device_batch is not None and args.global_batch is not None:
        raise ConfigError("give --per-device-batch (weak scaling) or --global-batch (strong scaling), not both")
    per = args.per_device_batch if args.per_device_batch is not None or args.global_batch is not None else 8
    for name, v in (("steps", args.steps), ("per_device_batch", per), ("global_batch", args.global_batch),
                     ("batch_scale", args.batch_scale)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ConfigError(f"{name} = {v!r} is invalid; give an integer >= 1")
    return Settings(workload, steps=args.steps, per_device_batch=per if args.global_batch is None else None,
                    global_batch=args.global_batch, batch_scale=args.batch_scale, seed=args.seed,
                    overlap=args.overlap, lr=args.lr, bucket_mb=args.bucket_mb)


def _cwd_importable() -> None:
    """Let `--workload mymodule:attr` find modules in the current directory, as `python -m` would."""
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def _workload(args):
    from emulator import workloads
    _cwd_importable()
    return workloads.get(args.workload)


def _capacity(memory_mb: float) -> int:
    """Devices this host's memory holds (each a torch process, ~175 MB unique, reserved at memory_mb)."""
    import psutil
    return max(1, int(psutil.virtual_memory().available * 0.8 // (memory_mb * 2**20)))


def _progress(total: int, what: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=what, unit="point", file=sys.stderr, leave=False, disable=None)


# ---------------------------------------------------------------- relay run
def faults_from(args, devices: int):
    """--fail device=K,step=S and --straggler device=K,slowdown=X[,links=Y] as Faults."""
    from emulator.device import Faults

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


def cmd_run(args) -> None:
    from emulator import Cluster
    from emulator.collectives.schedules import check
    from emulator.monitor import DeviceError
    from emulator.results import write_run
    from launch.cli import system_from
    defaults(args)
    system = system_from(args)
    wl = _workload(args)
    settings = settings_from(args, wl)
    check("all_reduce", args.algorithm)
    b = settings.per_device(system.devices)
    cluster = Cluster(system, clock=args.clock, dilation=args.dilation, address=args.address,
                      faults=faults_from(args, system.devices), timeout_s=args.timeout_s or 30.0)
    cluster.preflight(wl, settings.steps, b, args.algorithm, settings.lr, None, settings.bucket_mb,
                      settings.batch_scale)  # every check that needs no device, before any starts
    name = args.name or f"run-{wl.name}-{system.chip.name}x{system.devices}"
    out = ResultsDir(args.out, name)
    try:
        with cluster:
            res = cluster.train(wl, steps=settings.steps, per_device_batch=b, algorithm=args.algorithm,
                                seed=settings.seed, overlap=settings.overlap, lr=settings.lr,
                                bucket_mb=settings.bucket_mb, batch_scale=settings.batch_scale)
    except DeviceError as e:
        if e.completed is not None:  # keep the steps that finished, and say so
            config = {"command": "run", "options": vars_of(args), "training": e.completed.config,
                      "system": system_dict(system), "status": "failed", "error": str(e),
                      **environment(cluster.host)}
            write_run(out, config, e.completed, system)
            e.cause += f" ({e.step} completed step(s) kept in {out.path})"
        raise
    config = {"command": "run", "options": vars_of(args), "training": res.config,
              "system": system_dict(system), "status": "complete", **environment(cluster.host)}
    write_run(out, config, res, system, trace=args.trace)
    s = res.summary()
    print(f"# relay run: {wl.name} on {system.describe()}, {args.algorithm}, {args.clock} clock")
    print(tabulate(run_table(s, res.config), headers=["figure", "value", "unit"], disable_numparse=True))
    print(f"# results: {out.path}" + (" (with trace.json for Perfetto)" if args.trace else ""))


def run_table(s: dict, config: dict) -> list[list]:
    unit = "tokens" if s.get("tokens_per_s") else "samples"
    basis = config.get("power_basis", "chip")
    rows = [["step time", fmt(s["step_s"], 1e3), "emulated ms"],
            ["compute", fmt(s["compute_s"], 1e3), "emulated ms"],
            ["communication (total)", fmt(s["comm_s"], 1e3), "emulated ms"],
            ["communication (exposed)", fmt(s["exposed_comm_s"], 1e3), "emulated ms"],
            ["throughput", fmt(s.get("tokens_per_s") or s["samples_per_s"]), f"{unit} per emulated s"],
            ["model FLOPs utilisation", fmt(s["mfu"], 100), "% of dense BF16 peak"],
            ["energy per step", fmt(s["energy_j"]), f"J (emulated, {basis} power)"],
            [f"energy per {unit[:-1]}", fmt(s.get("energy_per_token_j") or s.get("energy_per_sample_j")),
             f"J (emulated, {basis} power)"],
            ["final loss", fmt(s["final_loss"], digits=4), "nats" if config.get("loss_floor") else ""],
            ["host time per step", fmt(s["wall_s"]), "real s"],
            ["fidelity", fmt(s["fidelity"], digits=4), "wall clock: 1.0 = exact"]]
    if config.get("loss_floor") is not None:
        rows.insert(9, ["best achievable loss", fmt(config["loss_floor"], digits=4), "nats"])
    return rows


def vars_of(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "fn"}


# ---------------------------------------------------------------- relay sweep
def sweep_systems(args) -> list[System]:
    from launch.cli import UsageError
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
                  "lr", "bucket_mb", "clock", "scaling", "algorithms", "fail", "straggler")


def _resume(out: ResultsDir, args) -> tuple[dict, list[dict]]:
    """Points an earlier, interrupted run of the same sweep ran, and their step rows."""
    import csv
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
    from emulator import Cluster
    from emulator.collectives.schedules import check
    from emulator.experiment import sweep
    from emulator.results import write_points
    from emulator.trainer import check_memory
    defaults(args, {"algorithms": "ring", "scaling": "weak"})
    if args.scaling not in ("weak", "strong"):
        raise ConfigError(f"scaling = {args.scaling!r} is unknown; choose 'weak' or 'strong'")
    if args.scaling == "strong" and args.global_batch is None:
        raise ConfigError("strong scaling needs --global-batch (the batch divided over the devices)")
    if args.scaling == "weak" and args.global_batch is not None:
        raise ConfigError("weak scaling fixes --per-device-batch; for a fixed --global-batch use --scaling strong")
    systems = sweep_systems(args)
    algorithms = as_list(args.algorithms)
    for a in algorithms:
        check("all_reduce", a)
    wl = _workload(args)
    settings = settings_from(args, wl)
    for s in systems:
        check_memory(wl, s, settings.per_device(s.devices), batch_scale=settings.batch_scale)
    capacity = min(_capacity(MEMORY_MB), args.max_real_devices or 10**9)
    name = args.name or f"sweep-{wl.name}"
    out = ResultsDir(args.out, name)
    done, earlier = _resume(out, args)
    if done:
        print(f"# resuming {out.path}: {len(done)} point(s) already run, skipped", file=sys.stderr)
    first = min(systems, key=lambda s: s.devices)
    faults = faults_from(args, first.devices)  # a fault must name a device of every point
    with Cluster(first.scaled(min(max(s.devices for s in systems), capacity)), clock=args.clock,
                 dilation=args.dilation, address=args.address, faults=faults,
                 timeout_s=args.timeout_s or 30.0) as cluster:
        config = {"command": "sweep", "options": vars_of(args), "scaling": args.scaling,
                  "systems": [system_dict(s) for s in systems], **environment(cluster.host)}
        measured = []

        def save(point):  # after every point, so that an interrupted sweep loses nothing
            measured.append(point)
            write_points(out, "sweep", config, measured, {"status": "partial"}, plots=False,
                         earlier_steps=earlier)

        with _progress(len(systems) * len(algorithms), "sweep") as bar:
            points = sweep(cluster, systems, algorithms, settings, capacity, progress=bar, on_point=save,
                           done=done)
    write_points(out, "sweep", config, points, {"status": "complete"}, earlier_steps=earlier)
    print(f"# relay sweep: {wl.name}, {args.scaling} scaling, {args.clock} clock")
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


# ---------------------------------------------------------------- relay breakeven
def breakeven_systems(args) -> tuple[System, System]:
    from launch.cli import UsageError
    if not args.fast or not args.slow:
        raise UsageError("say what to compare: --fast SYSTEM (preset or chip) --slow CHIP (or preset)")
    fast = _system_or_chip(args.fast, args.fast_devices, "--fast")
    slow = _system_or_chip(args.slow, None, "--slow")
    return fast, slow


def _system_or_chip(name: str, devices: int | None, flag: str) -> System:
    from emulator import chips
    from emulator.system import PRESETS
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
    from emulator import Cluster
    from emulator.collectives.schedules import check
    from emulator.experiment import breakeven, sweep
    from emulator.results import write_points
    from emulator.trainer import check_memory
    defaults(args, {"algorithms": "ring", "metric": "throughput", "steps": 4})
    fast, slow = breakeven_systems(args)
    algorithms = as_list(args.algorithms)
    for a in algorithms:
        check("all_reduce", a)
    if args.metric not in ("throughput", "time-to-loss"):
        raise ConfigError(f"metric = {args.metric!r} is unknown; choose throughput or time-to-loss")
    if args.metric == "time-to-loss" and args.target_loss is None:
        raise ConfigError("--metric time-to-loss needs --target-loss (the loss both sides must reach)")
    wl = _workload(args)
    settings = settings_from(args, wl)
    if settings.global_batch is not None:
        raise ConfigError("break-even compares at a fixed per-device batch (weak scaling); drop --global-batch")
    check_memory(wl, fast, settings.per_device_batch, batch_scale=settings.batch_scale)
    check_memory(wl, slow.scaled(1), settings.per_device_batch, batch_scale=settings.batch_scale)
    capacity = min(_capacity(MEMORY_MB), args.max_real_devices or 10**9)
    name = args.name or f"breakeven-{fast.name or fast.chip.name}-vs-{slow.chip.name}"
    out = ResultsDir(args.out, name)
    results, seen, extra = [], {}, {}
    faults = faults_from(args, 1)  # every break-even search starts from one device
    with Cluster(fast.scaled(min(fast.devices, capacity)), clock=args.clock, dilation=args.dilation,
                 address=args.address, faults=faults, timeout_s=args.timeout_s or 30.0) as cluster:
        with _progress(0, "break-even runs") as bar:
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
        config = {"command": "breakeven", "options": vars_of(args), "fast": system_dict(fast),
                  "slow": system_dict(slow), "capacity": capacity, **environment(cluster.host)}
    points = sorted(seen.values(), key=lambda p: (p.system.chip.name != slow.chip.name, p.algorithm, p.system.devices))
    rows = [r.row() for r in results]
    summary = write_points(out, "breakeven", config, points, {"breakeven": rows, "fast": system_dict(fast),
                                                               "slow": system_dict(slow), **extra})
    out.write_text("summary.md", summary_md(summary, settings))
    print(f"# relay breakeven: {wl.name}, {fast.describe()} against {slow.chip.name}, {args.metric}")
    print(breakeven_table(rows))
    for r in rows:
        for line in checks(r):
            print(f"# {r['algorithm']}: {line}")
    if extra.get("sensitivity"):
        print(f"# sensitivity: {2 * len(extra['sensitivity']['rows'])} break-even searches "
              f"({extra['sensitivity']['algorithm']}) took {extra['sensitivity']['host_s']:.0f} s (host); see summary.md")
    print(f"# results: {out.path}")


def _beyond_the_search(args, cluster, fast, slow, results, seen, settings, capacity, on_point) -> dict:
    """The full systems predicted (when both sides are presets) and, with --sensitivity, the
    break-even's sensitivity to the uncertain model parameters (emulator/sensitivity.py)."""
    from emulator.sensitivity import full_scale, sensitivity
    from emulator.system import PRESETS
    reached = [r for r in results if r.devices]
    if not reached:
        return {}
    best = min(reached, key=lambda r: r.devices)  # the algorithm summary.md's finding names
    real = [p for (_, a), p in seen.items() if a == best.algorithm and not p.predicted]
    extra = {}
    if fast.name in PRESETS and slow.name in PRESETS:
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
                   ("falls short, as it must" if row["verified"] else "ALSO REACHES the target: the answer is not the smallest"))
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
    """The Settings a results folder was made with, from its config.json."""
    from emulator import workloads
    from emulator.experiment import Settings
    o = config["options"]
    try:
        wl = workloads.get(o["workload"])
    except ValueError:  # a user's workload that is not importable here: its name is enough
        wl = type("W", (), {"name": o["workload"], "tokens_per_sample": None})()
    return Settings(wl, steps=o["steps"], per_device_batch=o["per_device_batch"] or 8,
                    batch_scale=o["batch_scale"] or 1)


# ---------------------------------------------------------------- relay report
def cmd_report(args) -> None:
    from emulator.results import draw
    path = Path(args.path)
    if not (path / "summary.json").exists():
        raise ConfigError(f"{str(path)!r} is not a results folder (no summary.json); give results/<name>")
    out = ResultsDir(path.parent, path.name)
    summary = out.read_json("summary.json")
    drawn = draw(out, summary)
    kind = summary["kind"]
    print(f"# relay report: {path} ({kind})")
    if kind == "run":
        config = out.read_json("config.json")["training"]
        print(tabulate(run_table(summary["summary"], config), headers=["figure", "value", "unit"],
                       disable_numparse=True))
    elif kind in ("sweep", "breakeven"):
        print(points_table(summary["points"]))
        if kind == "breakeven":
            print()
            print(breakeven_table(summary["breakeven"]))
            out.write_text("summary.md", summary_md(summary, _settings_of(out.read_json("config.json"))))
    elif kind == "bench":
        print(tabulate([[r["size_bytes"], r["algorithm"], fmt(r["time_us"]), fmt(r["busbw_GBps"])]
                        for r in summary["rows"]],
                       headers=["size (B)", "algorithm", "emul time (us)", "emul busbw (GB/s)"], disable_numparse=True))
    print("# plots: " + ", ".join(p.name for p in drawn))
