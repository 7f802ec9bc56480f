"""summary.md of a full-scale break-even (launch/fullscale.py), from its summary.json: the answer
per workload, the plans chosen, MFU beside published MFUs, the step breakdown, energy, the
sensitivity, and what Relay does not model. Every figure is labelled emulated or published."""

from __future__ import annotations

from relay import System
from relay.launch import fullscale_risk
from relay.launch.published import comparison, mfus

PARTS = (("compute", "compute"), ("tensor_parallel", "exposed TP"), ("pipeline", "pipeline bubble + p2p"),
         ("expert_all_to_all", "expert all-to-all"), ("data_parallel", "data parallel"))

NOT_MODELLED = [
    "Every figure comes from the analytic plan search: per-block costs measured on fake tensors by the "
    "cost model, collectives by closed forms; no device ran these plans (`relay plan --confirm` checks "
    "the analytic model against fake-tensor runs).",
    "MoE routing is balanced in the answer; skewed routing (Zipf, hottest experts on one device) is costed "
    "separately below and in the range: the busiest device's experts and all-to-all, not a real router's "
    "per-batch loads, nor expert placement that spreads hot experts.",
    "Overlap is as the fake-tensor runs on the emulated timeline show it (the planner's calibration): DDP's "
    "buckets hide behind the backward pass (not under a pipeline); FSDP2's gathers and reduce-scatters are "
    "prefetched as on a GPU (the host runs ahead of the device); under a pipeline the reduce-scatters, sent "
    "after the schedule, are exposed; "
    "tensor-parallel, expert and pipeline messages are exposed.",
    "One step is the steady state: failures and checkpoints enter only the goodput section (published "
    "interruption rates, a storage bandwidth, Daly's interval); no stragglers, thermal throttling, network "
    "congestion between jobs, or input pipeline.",
    "Both sides in BF16 (FP8 is emulated, `--precision fp8`, but the 910C has none); MLA and the MoE blocks "
    "are modelled as workloads/ "
    "builds them; DeepSeek's DualPipe and its all-to-all kernels are not.",
    "Power is the catalog's all-in figure per device times the devices, whatever the load (no idle or "
    "partial-load power); scale-out switches between racks are not added for the multi-rack systems.",
]


def summary_md(s: dict) -> str:
    fast, slow = s["fast"], s["slow"]
    T = s["train_tokens"]
    lines = [f"# {slow['name']} against {fast['name']} at full scale", "",
             f"How many {slow['chip']['display']} (in {slow['name']} domains of up to {slow['domain']}, several "
             f"joined by the chip's scale-out beyond that) match a full {fast['name']} ({fast['devices']} x "
             f"{fast['chip']['display']}), each side running the best plan Relay's plan search finds at every "
             f"device count (dp, fsdp, tp, pp, ep, microbatches, recompute; pruned by memory, ranked by the "
             f"analytic emulated step). Both sides train the same global batch: {s['global_batch']} samples per "
             "step. **Every figure is emulated** (Relay's cost and fabric models, no device ran) unless marked "
             f"published or catalog. Time to train is for T = {T:.3g} tokens; energy uses the presets' all-in "
             f"power per device ({fast['power_w']:.0f} W per B200, {slow['power_w']:.0f} W per 910C). "
             f"Generating this folder took {s['host_s']:.0f} s of real time on this host (2 cores shared with other "
             "jobs).", ""]
    lines += _answer(s)
    lines += _plans(s)
    lines += _mfu(s)
    lines += _context(s)
    lines += _sensitivity(s)
    lines += fullscale_risk.summary_md(s)  # routing skew, goodput, the answer as a range
    lines += ["", "## What Relay does not model", ""] + [f"- {x}" for x in NOT_MODELLED]
    return "\n".join(lines) + "\n"


def _answer(s: dict) -> list[str]:
    T = s["train_tokens"]
    lines = ["## The answer", "",
             "| workload (tokens per step) | fast system | best plan | tokens/s (emulated) | break-even 910C "
             "(emulated) | best plan there | tokens/s (emulated) | next count below (emulated tokens/s) | "
             f"naive count (FLOPS ratio, catalog) | days to train {T:.3g} tokens, fast / slow (emulated) | "
             "J per token, fast / slow (emulated, all-in) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in s["workloads"]:
        for r in run["breakeven"]:
            f, sl, b = r["fast"], r["slow"], r["below"]
            head = (f"| {run['workload']} ({run['tokens_per_step']:,}) | {r['racks']} x NVL72 ({f['devices']} B200) | "
                    f"{f['plan']} | {f['tokens_per_s']:,.0f} |")
            if not sl:
                lines.append(f"{head} not reached up to {s['max_devices']} | - | - | - | {r['naive']:.0f} | "
                             f"{f['days_to_train']:.1f} / - | {f['energy_per_token_j']:.2f} / - |")
                continue
            lines.append(f"{head} **{r['devices']}** ({sl['domains']} domain(s)) | {sl['plan']} | {_tps(sl)} | "
                         f"{_below(b)} | {r['naive']:.0f} | {f['days_to_train']:.1f} / {sl['days_to_train']:.1f} | "
                         f"{f['energy_per_token_j']:.2f} / {sl['energy_per_token_j']:.2f} |")
    lines.append("")
    for run in s["workloads"]:
        r = run["breakeven"][0]
        f, sl = r["fast"], r["slow"]
        if not sl:
            lines.append(f"**{run['workload']}.** No count up to {s['max_devices']} 910C matches "
                         f"{r['racks']} NVL72 (emulated).")
            continue
        lines.append(
            f"**{run['workload']}.** {r['devices']} Ascend 910C match one NVL72's {f['tokens_per_s']:,.0f} emulated "
            f"tokens/s ({sl['tokens_per_s']:,.0f} with {sl['plan']}), against {r['naive']:.0f} from the FLOPS "
            f"ratio alone; the next smaller count with a valid plan, {r['below']['devices']}, "
            f"{'falls short' if r['below']['plan'] else 'has none that fits in memory'}. They spend "
            f"{sl['energy_per_token_j'] / f['energy_per_token_j']:.2f}x the energy per token (emulated, all-in "
            f"power) and train {s['train_tokens']:.3g} tokens in {sl['days_to_train']:.1f} days against "
            f"{f['days_to_train']:.1f}.")
        more = [x for x in run["breakeven"][1:] if x["slow"]]
        if more:
            lines[-1] += " With more racks (joined by the B200's scale-out, as the catalog gives it): " + "; ".join(
                f"{x['racks']} x NVL72 ({x['fast']['tokens_per_s'] / f['tokens_per_s']:.2f}x one rack's tokens/s, "
                f"best plan at {x['fast']['memory_gb']:.0f} of {x['fast']['hbm_gb']:.0f} GB) are matched by "
                f"{x['devices']} 910C ({x['devices'] / s['slow']['domain']:.2f} {s['slow']['name']})"
                for x in more) + (f"; one rack's best plan holds {f['memory_gb']:.0f} of {f['hbm_gb']:.0f} GB per "
                                  "B200: memory, not compute, shapes its plan, so more racks scale better than "
                                  "linearly." if any(x["fast"]["tokens_per_s"] > 1.05 * x["racks"] * f["tokens_per_s"]
                                                     for x in more) else ".")
        lines.append("")
    lines += ["", "The search scans every device count that has a valid plan, in ascending order, from the count "
              "that would match at 100% MFU (none below it can), so each answer is the smallest matching count; "
              "counts in between often have no good plan at this global batch (the data-parallel degree must "
              "divide it), which is why throughput is not monotone in the device count (the plot)."]
    return lines


def _tps(p) -> str:
    return f"{p['tokens_per_s']:,.0f}" if p else "-"


def _below(b) -> str:
    if not b:
        return "-"
    return f"{b['devices']}: {b['tokens_per_s']:,.0f}" if b["plan"] else f"{b['devices']}: no plan fits in memory"


def _full(run: dict, devices: int):
    return next((p for p in run["curve"] if p["devices"] == devices and p["plan"]), None)


def _plans(s: dict) -> list[str]:
    lines = ["", "## Plans chosen and the step (emulated)", "",
             "The best plan of each system from the search, its step split into the planner's parts "
             "(emulated seconds per step, on the slowest pipeline stage) and its memory.", "",
             "| workload | system | devices | plan | micro-batch (samples) | step (emulated s) | "
             + " | ".join(f"{label} (emulated s)" for _, label in PARTS)
             + " | MFU (emulated %) | peak memory / HBM (GB per device, emulated) |",
             "|---|---|---|---|---|---|" + "---|" * len(PARTS) + "---|---|"]
    for run in s["workloads"]:
        for name, p in _systems(s, run):
            bd = p["breakdown"]
            lines.append(f"| {run['workload']} | {name} | {p['devices']} | {p['plan']} | {p['micro_batch']} | "
                         f"{p['step_s']:.2f} | " + " | ".join(f"{bd[k]:.2f}" for k, _ in PARTS)
                         + f" | {100 * p['mfu']:.1f} | {p['memory_gb']:.0f} / {p['hbm_gb']:.0f} |")
    return lines


def _systems(s: dict, run: dict) -> list:
    """(label, point) for the breakdown: the fast system, the slow side at break-even, the full slow
    system (when searched)."""
    r = run["breakeven"][0]
    out = [(f"{s['fast']['name']} ({r['racks']} rack)", r["fast"])]
    if r["slow"]:
        out.append(("910C at break-even", r["slow"]))
    full = _full(run, s["slow"]["devices"])
    if full and (not r["slow"] or full["devices"] != r["slow"]["devices"]):
        out.append((f"{s['slow']['name']} (full)", full))
    return out


def _mfu(s: dict) -> list[str]:
    lines = ["", "## MFU against published training runs", "",
             "| reference | published MFU | Relay's figure (emulated) | how far, and why |", "|---|---|---|---|"]
    by = {run["workload"]: run for run in s["workloads"]}
    for m in mfus():
        run = next((r for w, r in by.items() if ("deepseek" in w or "mixtral" in w) == (m["compare"] == "moe")),
                   None)
        if not run:
            continue
        pts = _systems(s, run)
        ours = "; ".join(f"{name}: {100 * p['mfu']:.1f}% ({_far(100 * p['mfu'], m['low'], m['high'])})"
                         for name, p in pts)
        lines.append(f"| {m['what']} ({m['source']}) | {m['low']}-{m['high']}% of the {m['dtype'].upper()} peak "
                     f"(published) | {run['workload']}: {ours} | {_why(m, pts)} |")
    return lines


def _far(v: float, lo: float, hi: float) -> str:
    if v < lo:
        return f"{lo - v:.1f} points below the range"
    if v > hi:
        return f"{v - hi:.1f} points above"
    return "inside"


STEADY = ("Relay's step is a steady state: overlap as the planner assumes it, no failures, stragglers or "
          "input stalls, GEMMs at the catalog's efficiency (0.766 of peak on the B200, from a measured "
          "best-shape GEMM; 0.846 on the 910C, from a 910B2 die's measured 4096^3 GEMM)")


def _why(m: dict, pts: list) -> str:
    if m["dtype"] != "bf16":
        lo, hi = 2 * m["low"], 2 * m["high"]
        return (f"Same model, but the published MFU is against the FP8 peak, twice the BF16 one: the same "
                f"throughput is {lo}-{hi}% of the BF16 peak, which BF16 training (all Relay emulates) cannot "
                "reach, so Relay's BF16 figures sit above the FP8-peak percentage and below its BF16 equivalent; "
                "not like for like.")
    if m["compare"] == "moe":
        pipe = max(pts, key=lambda x: x[1]["breakdown"]["pipeline"] / x[1]["step_s"])
        return (f"Another chip (910B-class, not the 910C), a 718B MoE on thousands of NPUs with real routing "
                "imbalance; Relay's MoE has balanced routing, which flatters it. Where Relay is below, the plan "
                f"is pipeline-bound: {pipe[0]} spends {pipe[1]['breakdown']['pipeline']:.1f} of "
                f"{pipe[1]['step_s']:.1f} emulated s in the bubble and p2p, and its expert all-to-alls are "
                f"exposed; {STEADY}.")
    return (f"Another chip (H100) and a larger dense model at the same precision. {STEADY}, so Relay belongs at the "
            "top of the published range, where its figures are.")


def _context(s: dict) -> list[str]:
    F, S = System.preset(s["fast"]["name"]), System.preset(s["slow"]["name"])
    lines = ["", f"## {S.name} over {F.name}: the systems in context", "",
             "| ratio, full systems | catalog or emulated | published (SemiAnalysis) |", "|---|---|---|"]
    pub = (comparison(F.name, S.name) or {}).get("ratios", {})
    hbm = lambda x: x.devices * x.chip.hbm_bytes  # noqa: E731
    bw = lambda x: x.devices * x.chip.hbm_Bps  # noqa: E731
    power = S.total_power_w / F.total_power_w
    flops = S.peak_flops / F.peak_flops
    rows = [("dense BF16 FLOPS", f"{flops:.2f}x ({S.peak_flops / 1e15:.0f} vs {F.peak_flops / 1e15:.0f} PFLOPS, "
             "catalog)", pub.get("dense BF16 FLOPS"), "(300 vs 180 PFLOPS)"),
            ("HBM capacity", f"{hbm(S) / hbm(F):.2f}x (catalog)", pub.get("HBM capacity"), ""),
            ("HBM bandwidth", f"{bw(S) / bw(F):.2f}x (catalog)", pub.get("HBM bandwidth"), ""),
            ("power (all-in)", f"{power:.2f}x ({S.total_power_w / 1e3:.0f} vs {F.total_power_w / 1e3:.0f} kW, "
             "presets)", pub.get("power (all-in)"), "(559 vs 145 kW)"),
            ("power per FLOP", f"{power / flops:.2f}x (catalog)", pub.get("power per FLOP (all-in)"), "")]
    for name, ours, theirs, note in rows:
        lines.append(f"| {name} | {ours} | {'-' if theirs is None else f'{theirs:g}x {note}'.strip()} |")
    for run in s["workloads"]:
        f, full = run["breakeven"][0]["fast"], _full(run, S.devices)
        if full and run["breakeven"][0]["racks"] == 1:
            lines.append(f"| {run['workload']}: tokens/s, full systems | "
                         f"{full['tokens_per_s'] / f['tokens_per_s']:.2f}x (emulated) | - |")
            lines.append(f"| {run['workload']}: energy per token, full systems | "
                         f"{full['energy_per_token_j'] / f['energy_per_token_j']:.2f}x (emulated) | - |")
    lines += ["", "SemiAnalysis counts 780 dense BF16 TFLOPS per 910C; the catalog has Huawei's 752 (arXiv "
              "2506.12708), hence 289 rather than 300 PFLOPS."]
    return lines


def _sensitivity(s: dict) -> list[str]:
    runs = [r for r in s["workloads"] if r.get("sensitivity")]
    if not runs:
        return []
    lines = ["", "## Sensitivity of the answer (emulated)", "",
             "Break-even 910C count against one NVL72 when one uncertain input of the slow side is moved by "
             "the factor shown, the others at their catalog values; each case is a new break-even search "
             "through the same inputs the planner uses (a chip figure through a variant chip whose blocks are "
             "measured anew, a link figure through the system's own fields).", "",
             "| workload | input | catalog | low factor | break-even | high factor | break-even | why uncertain |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        sens = run["sensitivity"]
        for r in sens["rows"]:
            lines.append(f"| {run['workload']} | {r['what']} | {r['catalog']:g} | x{r['low']:g} | "
                         f"{r['low_devices'] or 'not reached'} | x{r['high']:g} | "
                         f"{r['high_devices'] or 'not reached'} | {r['why']} |")
        if "deepseek" in run["workload"] or "mixtral" in run["workload"]:
            lines.append(f"| {run['workload']} | MoE routing skew | balanced | - | see below | - | see below | "
                         "costed in the routing skew section and sampled in the range |")
        lines.append(f"| {run['workload']} | (catalog figures) | | | {sens['base_devices']} | | | "
                     f"{len(sens['rows']) * 2} searches took {sens['host_s']:.0f} s (real) |")
    return lines
