"""`relay breakeven`: how many slow devices match the fast system, and the findings in words."""

from __future__ import annotations

import math
from types import SimpleNamespace

from tabulate import tabulate

from emulator import Cluster, System, TrainConfig, chips
from emulator.driver.experiment import breakeven, sweep
from emulator.driver.session import MEMORY_MB
from emulator.driver.training import check_memory
from emulator.hardware.system import PRESETS
from emulator.results.folder import ResultsDir, environment, fmt, system_dict
from emulator.results.write import write_points
from emulator.trainer import defaults as train_defaults
from launch.options import UsageError, as_list, config_from, faults_from, other_defaults, progress, vars_of
from launch.options import capacity as host_capacity


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
        raise ValueError(f"{flag} = {name!r} is neither a system preset ({', '.join(PRESETS)}) nor a chip "
                         f"in the catalog (`relay chips` lists them)") from None
    if flag == "--fast" and not devices:
        raise ValueError(f"--fast = {name!r} is a chip; say how many with --fast-devices N")
    # a bare chip: one scale-up domain of any size, the chip's own links
    return System(name, devices or 4096)


def cmd_breakeven(args) -> None:
    other_defaults(args)
    args.algorithms = args.algorithms or train_defaults()["algorithm"]
    args.metric = args.metric or "throughput"
    fast, slow = breakeven_systems(args)
    algorithms = as_list(args.algorithms)
    if args.metric not in ("throughput", "time-to-loss"):
        raise ValueError(f"metric = {args.metric!r} is unknown; choose throughput or time-to-loss")
    if args.metric == "time-to-loss" and args.target_loss is None:
        raise ValueError("--metric time-to-loss needs --target-loss (the loss both sides must reach)")
    settings = config_from(args)
    if not settings.weak:
        raise ValueError("break-even compares at a fixed per-device batch (weak scaling); drop --global-batch")
    settings = settings.replace(per_device_batch=settings.batch_for(1))
    for a in algorithms:
        settings.replace(algorithm=a)  # refuses an unknown algorithm
    check_memory(settings, fast, settings.per_device_batch)
    check_memory(settings, slow.scaled(1), settings.per_device_batch)
    capacity = min(host_capacity(MEMORY_MB), args.max_real_devices or 10**9)
    name = args.name or f"breakeven-{fast.name or fast.chip.name}-vs-{slow.chip.name}"
    out = ResultsDir(args.out, name)
    results, seen = [], {}
    faults = faults_from(args, 1)  # every break-even search starts from one device
    with Cluster(fast.scaled(min(fast.devices, capacity)), clock=args.clock, dilation=args.dilation,
                 address=args.address, faults=faults, timeout_s=args.timeout_s or 30.0) as cluster:
        with progress(0, "break-even runs") as bar:
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
        config = {"command": "breakeven", "options": vars_of(args), "training": settings.as_dict(),
                  "fast": system_dict(fast), "slow": system_dict(slow), "capacity": capacity,
                  **environment(cluster.host)}
    points = sorted(seen.values(), key=lambda p: (p.system.chip.name != slow.chip.name, p.algorithm, p.system.devices))
    rows = [r.row() for r in results]
    summary = write_points(out, "breakeven", config, points, {"breakeven": rows, "fast": system_dict(fast),
                                                               "slow": system_dict(slow)})
    out.write_text("summary.md", summary_md(summary, settings))
    print(f"# relay breakeven: {settings.workload.name}, {fast.describe()} against {slow.chip.name}, {args.metric}")
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
    """The TrainConfig a results folder was made with, from its config.json."""
    o = {**config["options"], **config.get("training", {})}
    try:
        settings = TrainConfig.from_options(o)
    except ValueError:  # a user's workload that is not importable here: its name is enough
        wl = SimpleNamespace(name=o["workload"], tokens_per_sample=None)
        return SimpleNamespace(workload=wl, steps=o["steps"], per_device_batch=o["per_device_batch"],
                               batch_scale=o["batch_scale"] or 1)
    return settings.replace(per_device_batch=settings.batch_for(1))
