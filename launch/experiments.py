"""`relay run`, `relay sweep`, `relay breakeven`, `relay report`: experiments from the command line."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from tabulate import tabulate

from emulator import System
from emulator.cluster import MEMORY_MB
from emulator.results import ResultsDir, environment, fmt, system_dict

RUN_DEFAULTS = {"workload": "gpt-tiny", "steps": 10, "batch_scale": 1, "seed": 0, "clock": "virtual",
                "out": "results", "algorithm": "auto", "overlap": True}


def as_list(value, typ=str) -> list:
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    try:
        return [typ(v.strip() if isinstance(v, str) else v) for v in items if str(v).strip()]
    except ValueError:
        raise ValueError(f"{value!r} is not a list of {typ.__name__}; write e.g. 1,2,4") from None


def defaults(args, extra: dict | None = None) -> None:
    for k, v in {**RUN_DEFAULTS, **(extra or {})}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def settings_from(args, workload):
    from emulator.experiment import Settings
    if args.per_device_batch is not None and args.global_batch is not None:
        raise ValueError("give --per-device-batch (weak scaling) or --global-batch (strong scaling), not both")
    per = args.per_device_batch if args.per_device_batch is not None or args.global_batch is not None else 8
    for name, v in (("steps", args.steps), ("per_device_batch", per), ("global_batch", args.global_batch),
                     ("batch_scale", args.batch_scale)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} = {v!r} is invalid; give an integer >= 1")
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
            raise ValueError(f"{flag} = {text!r} is not key=value pairs; write e.g. "
                             f"{'device=2,step=3' if flag == '--fail' else 'device=2,slowdown=2'}") from None
        if not {"device"} <= set(out) <= allowed:
            raise ValueError(f"{flag} = {text!r}: give device= and {' / '.join(sorted(allowed - {'device'}))}")
        return out

    fail, compute, links = None, {}, {}
    if getattr(args, "fail", None):
        f = fields("--fail", args.fail, {"device", "step"})
        if "step" not in f:
            raise ValueError(f"--fail = {args.fail!r}: say when, e.g. device=2,step=3")
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
    check("all_reduce", args.algorithm, allow_auto=True)
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
    rows = [["step time", fmt(s["step_s"], 1e3), "emulated ms"],
            ["compute", fmt(s["compute_s"], 1e3), "emulated ms"],
            ["communication (total)", fmt(s["comm_s"], 1e3), "emulated ms"],
            ["communication (exposed)", fmt(s["exposed_comm_s"], 1e3), "emulated ms"],
            ["throughput", fmt(s.get("tokens_per_s") or s["samples_per_s"]), f"{unit} per emulated s"],
            ["model FLOPs utilisation", fmt(s["mfu"], 100), "% of dense BF16 peak"],
            ["energy per step", fmt(s["energy_j"]), "J (emulated)"],
            [f"energy per {unit[:-1]}", fmt(s.get("energy_per_token_j") or s.get("energy_per_sample_j")),
             "J (emulated)"],
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
    """Points an earlier, interrupted run of the same sweep measured, and their step rows."""
    import csv
    if not (out.path / "summary.json").exists():
        return {}, []
    summary, config = out.read_json("summary.json"), out.read_json("config.json")
    if summary.get("kind") != "sweep":
        raise ValueError(f"results folder {str(out.path)!r} holds a {summary.get('kind')}, not a sweep; "
                         "choose another --name")
    before = config.get("options", {})
    changed = [k for k in SWEEP_IDENTITY if str(before.get(k)) != str(getattr(args, k, None))]
    if changed:
        raise ValueError(f"results folder {str(out.path)!r} holds a sweep with other settings ({', '.join(changed)}); "
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
    defaults(args, {"algorithms": "auto", "scaling": "weak"})
    if args.scaling not in ("weak", "strong"):
        raise ValueError(f"scaling = {args.scaling!r} is unknown; choose 'weak' or 'strong'")
    if args.scaling == "strong" and args.global_batch is None:
        raise ValueError("strong scaling needs --global-batch (the batch divided over the devices)")
    if args.scaling == "weak" and args.global_batch is not None:
        raise ValueError("weak scaling fixes --per-device-batch; for a fixed --global-batch use --scaling strong")
    systems = sweep_systems(args)
    algorithms = as_list(args.algorithms)
    for a in algorithms:
        check("all_reduce", a, allow_auto=True)
    wl = _workload(args)
    settings = settings_from(args, wl)
    for s in systems:
        check_memory(wl, s, settings.per_device(s.devices), batch_scale=settings.batch_scale)
    capacity = min(_capacity(MEMORY_MB), args.max_real_devices or 10**9)
    name = args.name or f"sweep-{wl.name}"
    out = ResultsDir(args.out, name)
    done, earlier = _resume(out, args)
    if done:
        print(f"# resuming {out.path}: {len(done)} point(s) already measured, skipped", file=sys.stderr)
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
                      fmt(r.get("energy_per_token_j") or r.get("energy_per_sample_j")),
                      "predicted" if r["predicted"] else "measured"] for r in rows],
                    headers=["chip", "devices", "algorithm", "global batch", "emul step (ms)",
                             "emul compute (ms)", "emul exposed comm (ms)", f"emul {unit}/s", "MFU (%)",
                             f"emul J/{unit[:-1]}", "how"], disable_numparse=True)


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
        raise ValueError(f"{flag} = {name!r} is neither a system preset ({', '.join(PRESETS)}) nor a chip "
                         f"in the catalog (`relay chips` lists them)") from None
    if flag == "--fast" and not devices:
        raise ValueError(f"--fast = {name!r} is a chip; say how many with --fast-devices N")
    # a bare chip: one scale-up domain of any size, the chip's own links
    return System(name, devices or 4096)


def cmd_breakeven(args) -> None:
    from emulator import Cluster
    from emulator.collectives.schedules import check
    from emulator.experiment import breakeven, sweep
    from emulator.results import write_points
    from emulator.trainer import check_memory
    defaults(args, {"algorithms": "auto", "metric": "throughput", "steps": 4})
    fast, slow = breakeven_systems(args)
    algorithms = as_list(args.algorithms)
    for a in algorithms:
        check("all_reduce", a, allow_auto=True)
    if args.metric not in ("throughput", "time-to-loss"):
        raise ValueError(f"metric = {args.metric!r} is unknown; choose throughput or time-to-loss")
    if args.metric == "time-to-loss" and args.target_loss is None:
        raise ValueError("--metric time-to-loss needs --target-loss (the loss both sides must reach)")
    wl = _workload(args)
    settings = settings_from(args, wl)
    if settings.global_batch is not None:
        raise ValueError("break-even compares at a fixed per-device batch (weak scaling); drop --global-batch")
    check_memory(wl, fast, settings.per_device_batch, batch_scale=settings.batch_scale)
    check_memory(wl, slow.scaled(1), settings.per_device_batch, batch_scale=settings.batch_scale)
    capacity = min(_capacity(MEMORY_MB), args.max_real_devices or 10**9)
    name = args.name or f"breakeven-{fast.name or fast.chip.name}-vs-{slow.chip.name}"
    out = ResultsDir(args.out, name)
    results, seen = [], {}
    faults = faults_from(args, 1)  # every break-even search starts from one device
    with Cluster(fast.scaled(min(fast.devices, capacity)), clock=args.clock, dilation=args.dilation,
                 address=args.address, faults=faults, timeout_s=args.timeout_s or 30.0) as cluster:
        with _progress(0, "break-even runs") as bar:
            def on_point(p):
                bar.total += 1
                bar.update(1)
                seen[(p.system, p.algorithm)] = p
            for a in algorithms:
                results.append(breakeven(cluster, fast, slow, a, settings, capacity, args.metric,
                                         args.target_loss, args.max_devices, on_point=on_point))
            curve = [slow.scaled(n) for n in as_list(args.curve, int)
                     if all((slow.scaled(n), a) not in seen for a in algorithms)]
            if curve:  # extra device counts, so that the plot shows the whole scaling curve
                sweep(cluster, curve, algorithms, settings, capacity, on_point=on_point)
        config = {"command": "breakeven", "options": vars_of(args), "fast": system_dict(fast),
                  "slow": system_dict(slow), "capacity": capacity, **environment(cluster.host)}
    points = sorted(seen.values(), key=lambda p: (p.system.chip.name != slow.chip.name, p.algorithm, p.system.devices))
    rows = [r.row() for r in results]
    summary = write_points(out, "breakeven", config, points, {"breakeven": rows, "fast": system_dict(fast),
                                                               "slow": system_dict(slow)})
    out.write_text("summary.md", summary_md(summary, settings))
    print(f"# relay breakeven: {wl.name}, {fast.describe()} against {slow.chip.name}, {args.metric}")
    print(breakeven_table(rows))
    print(f"# results: {out.path}")


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
                      fmt(r["slow_energy_per_unit_j"]), "predicted" if r["predicted"] else "measured"]
                     for r in rows],
                    headers=["algorithm", "fast system", f"fast ({what})", "break-even slow devices",
                             f"slow at break-even ({what})", "naive (FLOPS ratio)", "scaling eff. (%)",
                             f"fast J/{unit} (emul)", f"slow J/{unit} (emul)", "how"], disable_numparse=True)


def summary_md(summary: dict, settings) -> str:
    """The findings in words, from the numbers (written with every break-even result)."""
    fast, slow, rows = summary["fast"], summary["slow"], summary["breakeven"]
    fc, sc = fast["chip"], slow["chip"]
    lines = [f"# {summary['name']}", "",
             f"Fast system: {fast['devices']} x {fc['display'] or fc['name']} ({fast['name']}), "
             f"{fc['bf16_tflops']:g} BF16 TFLOPS each. Slow chip: {sc['display'] or sc['name']}, "
             f"{sc['bf16_tflops']:g} BF16 TFLOPS each, fabric of {slow['name']}.",
             f"Workload `{settings.workload.name}`, weak scaling at {settings.per_device_batch} samples per "
             f"device (charged as {settings.per_device_batch * settings.batch_scale}: batch_scale "
             f"{settings.batch_scale}), {settings.steps} steps per point. All times are emulated.", "",
             "| algorithm | break-even slow devices | naive (FLOPS ratio) | scaling efficiency | "
             f"energy per {rows[0]['energy_unit'] if rows else 'unit'}, fast / slow (J) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['algorithm']} | {r['break_even_devices'] or 'not reached'}"
                     f"{' (predicted)' if r['predicted'] else ''} | {r['naive_devices']:.1f} | "
                     f"{fmt(r['scaling_efficiency'], 100)}% | {fmt(r['fast_energy_per_unit_j'])} / "
                     f"{fmt(r['slow_energy_per_unit_j'])} |")
    reached = [r for r in rows if r["break_even_devices"]]
    lines.append("")
    if reached:
        best = min(reached, key=lambda r: r["break_even_devices"])
        ring = next((r for r in reached if r["algorithm"] == "ring"), None)
        naive = rows[0]["naive_devices"]
        lines.append(f"**Finding.** {best['break_even_devices']} {sc['name']} devices "
                     f"({best['algorithm']}) match the throughput of {fast['devices']} {fc['name']}"
                     + (f" ({ring['break_even_devices']} with ring)" if ring and ring is not best else "")
                     + f", against {math.ceil(naive)} from the FLOPS ratio alone "
                     f"({fast['devices']} x {fc['bf16_tflops']:g} / {sc['bf16_tflops']:g} = {naive:.1f}).")
        e_f, e_s = best["fast_energy_per_unit_j"], best["slow_energy_per_unit_j"]
        if e_f and e_s:
            lines.append(f"At break-even the slow system spends {e_s / e_f:.2f}x the energy per "
                         f"{best['energy_unit']} of the fast one.")
        lines += _in_context(fast, slow, best, summary["points"])
    return "\n".join(lines) + "\n"


def _in_context(fast: dict, slow: dict, best: dict, points: list[dict]) -> list[str]:
    """When both sides are system presets: the full systems' paper ratios against the measured one
    (linear weak scaling from the break-even point), and where the step time went."""
    from emulator.system import PRESETS
    if fast["name"] not in PRESETS or slow["name"] not in PRESETS:
        return []
    F, S = System.preset(fast["name"]), System.preset(slow["name"])
    measured = (S.devices / best["break_even_devices"]) * fast["devices"] / F.devices
    hbm = lambda s: s.devices * s.chip.hbm_Bps  # noqa: E731
    power = lambda s: s.devices * s.power_w  # noqa: E731
    one = {(p["chip"], p["devices"]): p for p in points if p["devices"] == 1}
    f1, s1 = one.get((F.chip.name, 1)), one.get((S.chip.name, 1))
    lines = ["", "## In context", "",
             f"| {S.name} over {F.name} (full systems) | ratio |", "|---|---|",
             f"| dense BF16 FLOPS (catalog: {S.chip.bf16_tflops:g} and {F.chip.bf16_tflops:g} TFLOPS) | "
             f"{S.peak_flops / F.peak_flops:.2f}x |",
             f"| HBM bandwidth | {hbm(S) / hbm(F):.2f}x |",
             f"| power (all-in) | {power(S) / power(F):.2f}x |",
             f"| **throughput on this workload (measured break-even, scaled linearly)** | **{measured:.2f}x** |",
             f"| energy per {best['energy_unit']} (measured at break-even) | "
             f"{best['slow_energy_per_unit_j'] / best['fast_energy_per_unit_j']:.2f}x |", "",
             "SemiAnalysis (SPECS.md), CloudMatrix 384 over GB200 NVL72: 1.7x FLOPS (with 780 TFLOPS per "
             "910C), 3.6x HBM capacity, 2.1x HBM bandwidth, 3.9x power, 2.3x more power per FLOP. At full scale "
             f"the naive count is {F.devices} x {F.chip.bf16_tflops:g} / 780 = "
             f"{F.devices * F.chip.bf16_tflops / 780:.0f} "
             f"(SemiAnalysis' FLOPS), {F.devices * F.chip.bf16_tflops / S.chip.bf16_tflops:.0f} with the catalog's "
             f"{S.chip.bf16_tflops:g}."]
    if f1 and s1:
        r, r_hbm, r_flops = s1["step_s"] / f1["step_s"], F.chip.hbm_tbps / S.chip.hbm_tbps, \
            F.chip.bf16_tflops / S.chip.bf16_tflops
        bound = "memory traffic and launch overhead" if abs(r - r_hbm) < abs(r - r_flops) else "FLOPS"
        comm = max((p["exposed_comm_s"] or 0) / p["step_s"] for p in points)
        lines += ["", f"Per chip: one {F.chip.name} takes {f1['step_s'] * 1e3:.2f} ms per step and one "
                  f"{S.chip.name} {s1['step_s'] * 1e3:.2f} ms ({r:.2f}x), at {100 * f1['mfu']:.1f}% and "
                  f"{100 * s1['mfu']:.1f}% MFU. The FLOPS ratio is {r_flops:.2f}x and the HBM-bandwidth ratio "
                  f"{r_hbm:.2f}x: this workload's kernels are bound by {bound}. Exposed communication is at "
                  f"most {100 * comm:.2f}% of a step at any point here, so the fabric and the all-reduce "
                  "algorithm move the answer little. Weak scaling means the slow side trains on a larger "
                  "global batch at the same throughput; `--metric time-to-loss` asks the other question."]
    return lines


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
        raise ValueError(f"{str(path)!r} is not a results folder (no summary.json); give results/<name>")
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
