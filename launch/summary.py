"""summary.md of a break-even: the findings in words, from the numbers in summary.json.

Every figure is labelled by where it comes from: emulated (a training run on the virtual or wall
clock), predicted (predict_point past the host's size, or the full systems), or catalog (the
chip catalog and system presets). Published comparisons come from launch/published.toml and are
shown only for the pair of systems they describe.
"""

from __future__ import annotations

import math

from relay import System
from relay.hardware.system import PRESETS
from relay.launch.published import comparison
from relay.results.folder import fmt


def summary_md(summary: dict, settings) -> str:
    fast, slow, rows = summary["fast"], summary["slow"], summary["breakeven"]
    fc, sc = fast["chip"], slow["chip"]
    unit = rows[0]["energy_unit"] if rows else "unit"
    lines = [f"# {summary['name']}", "",
             f"Fast system: {fast['devices']} x {fc['display'] or fc['name']} ({fast['name']}), "
             f"{fc['bf16_tflops']:g} BF16 TFLOPS each. Slow chip: {sc['display'] or sc['name']}, "
             f"{sc['bf16_tflops']:g} BF16 TFLOPS each, fabric of {slow['name']}.",
             f"Workload `{settings.workload.name}`, weak scaling at {settings.per_device_batch} samples per "
             f"device (charged as {settings.per_device_batch * settings.batch_scale}: batch_scale "
             f"{settings.batch_scale}), {settings.steps} steps per point. Every figure is emulated (computed "
             "by Relay's cost model and fabric model on real training runs), or predicted where marked.", "",
             f"| algorithm | break-even slow devices | one device fewer | naive (FLOPS ratio) | scaling efficiency | "
             f"energy per {unit}, fast / slow (J, emulated; power basis: fast {_basis(fast)}, slow {_basis(slow)}) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['algorithm']} | {r['break_even_devices'] or 'not reached'}"
                     f"{' (predicted)' if r['predicted'] else ''} | {_below(r)} | {r['naive_devices']:.1f} | "
                     f"{fmt(r['scaling_efficiency'], 100)}% | {fmt(r['fast_energy_per_unit_j'])} / "
                     f"{fmt(r['slow_energy_per_unit_j'])} |")
    lines.append("")
    for r in rows:
        if r.get("non_monotone"):
            steps = ", ".join(f"{a} -> {b}" for a, b in r["non_monotone"])
            lines.append(f"**Not monotone ({r['algorithm']}).** More slow devices did worse at {steps} "
                         "(devices). The search assumes the opposite; its answer was checked one device "
                         "below, but a smaller count past such a dip was not searched.")
    reached = [r for r in rows if r["break_even_devices"]]
    if not reached:
        return "\n".join(lines) + "\n"
    best = min(reached, key=lambda r: r["break_even_devices"])
    ring = next((r for r in reached if r["algorithm"] == "ring"), None)
    naive = rows[0]["naive_devices"]
    lines.append(f"**Finding.** {best['break_even_devices']} {sc['name']} devices "
                 f"({best['algorithm']}) match the emulated throughput of {fast['devices']} {fc['name']}"
                 + (f" ({ring['break_even_devices']} with ring)" if ring and ring is not best else "")
                 + f", against {math.ceil(naive)} from the FLOPS ratio alone "
                 f"({fast['devices']} x {fc['bf16_tflops']:g} / {sc['bf16_tflops']:g} = {naive:.1f}).")
    e_f, e_s = best["fast_energy_per_unit_j"], best["slow_energy_per_unit_j"]
    if e_f and e_s:
        lines.append(f"At break-even the slow system spends {e_s / e_f:.2f}x the emulated energy per "
                     f"{best['energy_unit']} of the fast one (power basis: fast {_basis(fast)}, slow {_basis(slow)}).")
    lines += _full_scale(summary.get("full_scale") or {}, unit)
    lines += _in_context(fast, slow, summary.get("full_scale") or {}, unit)
    lines += _per_chip(fast, slow, summary["points"])
    lines += _sensitivity(summary.get("sensitivity"), slow)
    return "\n".join(lines) + "\n"


def _basis(system: dict) -> str:
    return system.get("power_basis") or "chip"


def _below(r: dict) -> str:
    if r.get("below_devices") is None:
        return "-"
    verdict = "falls short" if r.get("verified") else "REACHES IT: the search's answer is not the smallest"
    return f"{r['below_devices']}: {fmt(r['below_value'])}, {verdict}"


def _full_scale(full: dict, unit: str) -> list[str]:
    if not full:
        return []
    f, s = full["fast"], full["slow"]
    ratio = s["throughput"] / f["throughput"]
    lines = ["", "## Full systems (predicted)", "",
             f"| predicted | fast: {f['system']}, {f['devices']} devices "
             f"| slow: {s['system']}, {s['devices']} devices |",
             "|---|---|---|",
             f"| throughput ({unit}s per emulated s) | {fmt(f['throughput'])} | {fmt(s['throughput'])} |",
             f"| step time (emulated ms) | {fmt(f['step_s'], 1e3)} | {fmt(s['step_s'], 1e3)} |",
             f"| all-reduce per step, of it exposed (emulated ms) | {fmt(f['comm_s'], 1e3)}, "
             f"{fmt(f['exposed_comm_s'], 1e3)} | {fmt(s['comm_s'], 1e3)}, {fmt(s['exposed_comm_s'], 1e3)} |",
             f"| energy per {unit} (J; power basis) | {fmt(f['energy_per_unit_j'])} ({f['power_basis']}) | "
             f"{fmt(s['energy_per_unit_j'])} ({s['power_basis']}) |", "",
             f"Predicted by predict_point from the largest real run of each chip ({f['from_devices']} and "
             f"{s['from_devices']} devices, {f['algorithm']}): per-device compute as run, each gradient "
             "bucket's all-reduce simulated on the full system, the run's exposed share of it kept. "
             f"The full {s['system']} would train {ratio:.2f}x as many {unit}s per second as the full "
             f"{f['system']} (predicted)."]
    return lines


def _in_context(fast: dict, slow: dict, full: dict, unit: str) -> list[str]:
    """Full systems: catalog ratios beside the predicted ones, and a published comparison of
    exactly this pair of systems when there is one."""
    if fast["name"] not in PRESETS or slow["name"] not in PRESETS:
        return []
    F, S = System.preset(fast["name"]), System.preset(slow["name"])
    hbm = lambda s: s.devices * s.chip.hbm_Bps  # noqa: E731
    lines = ["", "## In context", "",
             f"| {S.name} over {F.name} (full systems) | ratio | from |", "|---|---|---|",
             f"| dense BF16 FLOPS ({S.chip.bf16_tflops:g} and {F.chip.bf16_tflops:g} TFLOPS per chip) | "
             f"{S.peak_flops / F.peak_flops:.2f}x | catalog |",
             f"| HBM bandwidth | {hbm(S) / hbm(F):.2f}x | catalog |"]
    if S.total_power_w and F.total_power_w:
        basis = S.power_basis if S.power_basis == F.power_basis else f"{S.power_basis} over {F.power_basis}"
        lines.append(f"| power ({basis}) | {S.total_power_w / F.total_power_w:.2f}x | presets |")
    if full:
        f, s = full["fast"], full["slow"]
        lines.append(f"| throughput on this workload | {s['throughput'] / f['throughput']:.2f}x | predicted |")
        if f["energy_per_unit_j"] and s["energy_per_unit_j"]:
            lines.append(f"| energy per {unit} | {s['energy_per_unit_j'] / f['energy_per_unit_j']:.2f}x | "
                         "predicted |")
    pub = comparison(F.name, S.name)
    if pub:
        lines += ["", f"Published: {pub['source']}. {pub.get('note', '')}", "",
                  f"| {S.name} over {F.name} (published) | ratio |", "|---|---|"]
        lines += [f"| {k} | {v:g}x |" for k, v in pub["ratios"].items()]
        if pub.get("slow_chip_bf16_tflops"):
            per = pub["slow_chip_bf16_tflops"]
            lines += ["", f"At full scale the naive count is {F.devices} x {F.chip.bf16_tflops:g} / {per:g} = "
                      f"{F.devices * F.chip.bf16_tflops / per:.0f} with the published per-chip figure, "
                      f"{F.devices * F.chip.bf16_tflops / S.chip.bf16_tflops:.0f} with the catalog's "
                      f"{S.chip.bf16_tflops:g}."]
    return lines


def _per_chip(fast: dict, slow: dict, points: list[dict]) -> list[str]:
    fc, sc = fast["chip"], slow["chip"]
    one = {p["chip"]: p for p in points if p["devices"] == 1 and not p["predicted"]}
    f1, s1 = one.get(fc["name"]), one.get(sc["name"])
    if not (f1 and s1):
        return []
    r = s1["step_s"] / f1["step_s"]
    r_hbm, r_flops = fc["hbm_tbps"] / sc["hbm_tbps"], fc["bf16_tflops"] / sc["bf16_tflops"]
    comm = max((p["exposed_comm_s"] or 0) / p["step_s"] for p in points if not p["predicted"])
    launch = (f"{fc['launch_us']:g} us on both chips" if fc["launch_us"] == sc["launch_us"]
              else f"{fc['launch_us']:g} us on the {fc['name']}, {sc['launch_us']:g} us on the {sc['name']}")
    if abs(r - r_hbm) < abs(r - r_flops):
        why = (f"closer to the HBM-bandwidth ratio ({r_hbm:.2f}x) than to the FLOPS ratio ({r_flops:.2f}x): "
               "this workload's kernels are mostly memory-bound. It is not the HBM ratio itself: every kernel "
               f"also pays a fixed launch overhead (launch_us: {launch} in the catalog), which does not "
               "shrink with bandwidth or FLOPS and pulls the ratio "
               f"{'below' if r < r_hbm else 'away from'} the bandwidth ratio")
    else:
        why = (f"closer to the FLOPS ratio ({r_flops:.2f}x) than to the HBM-bandwidth ratio ({r_hbm:.2f}x): "
               f"this workload's kernels are mostly compute-bound (launch_us: {launch})")
    return ["", "## Per chip", "",
            f"One {fc['name']} takes {f1['step_s'] * 1e3:.2f} ms per step and one {sc['name']} "
            f"{s1['step_s'] * 1e3:.2f} ms (emulated), a ratio of {r:.2f}x, at {100 * f1['mfu']:.1f}% and "
            f"{100 * s1['mfu']:.1f}% MFU. That ratio is {why}. Exposed communication is at most "
            f"{100 * comm:.2f}% of a step at any point run here. Weak scaling means the slow side trains on a "
            "larger global batch at the same throughput; `--metric time-to-loss` asks the other question."]


def _sensitivity(sens: dict | None, slow: dict) -> list[str]:
    if not sens:
        return []
    sc = slow["chip"]["name"]
    lines = ["", "## Sensitivity", "",
             f"Break-even slow devices ({sens['algorithm']}; {sens['base_devices']} with the catalog's figures) "
             "when one parameter moves to the low or high end of its plausible range, the others staying "
             "at their catalog values. launch_us is one figure for every chip, so it moves on both sides "
             f"by the same factor; the others move on the slow side only ({sc} and the {slow['name']} "
             "fabric, the less documented side). Each case is a new break-even search on the virtual "
             f"clock, from the main answer (reusing the fast system's runs where it is unchanged); all "
             f"{2 * len(sens['rows'])} took "
             f"{sens['host_s']:.0f} s of host time. Link efficiency is moved by scaling the slow "
             "system's scale-up and scale-out bandwidth, on top of the calibrated fabric's own efficiency.", "",
             "| parameter | moved on | catalog | low end | break-even | high end | break-even | why this range |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sens["rows"]:
        def end(which):
            v = r[which]
            if not r["scales"]:
                shown = f"{v:g}"
            else:  # a factor on a catalog figure, or on the calibrated fabric (no single figure)
                shown = f"x{v:g}" + ("" if r["catalog"] is None else f" ({v * r['catalog']:g})")
            n = r[f"{which}_devices"]
            count = "not reached" if n is None else f"{n}{' (predicted)' if r[f'{which}_predicted'] else ''}"
            return shown, count
        (lo, n_lo), (hi, n_hi) = end("low"), end("high")
        catalog = "1 (the calibrated fabric)" if r["catalog"] is None else f"{r['catalog']:g}"
        side = "both sides" if r.get("side") == "both" else "slow side"
        lines.append(f"| {r['parameter']} | {side} | {catalog} | {lo} | {n_lo} | {hi} | {n_hi} | {r['why']} |")
    return lines
