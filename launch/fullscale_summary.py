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
    "Precision: the BF16 rows run both sides in BF16; the best-precision rows run the B200 in FP8 as torchao's "
    "float8 training does (Linear GEMMs in FP8 with their casts and scales charged, attention and the rest in "
    "BF16) and the 910C in BF16 (it has no FP8). The B200's FP8 GEMMs reach the catalog's `fp8_matmul_eff`, "
    "0.762 of the FP8 peak before a shape's quantisation, set from GB200's measured best-shape FP8 GEMM (3,616 "
    "of 5,000 TFLOPS, 0.723, torch._scaled_mm through cuBLAS) as its BF16 0.766 is. MLA and the MoE blocks are "
    "modelled as workloads/ builds them; DeepSeek's DualPipe and its all-to-all kernels are not.",
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
             f"analytic emulated step). {rule(s)} **Every figure is emulated** (Relay's cost and fabric "
             f"models, no device ran) unless marked published or catalog. Time to train is for T = {T:.3g} "
             f"tokens; energy uses the presets' all-in power per device ({fast['power_w']:.0f} W per B200, "
             f"{slow['power_w']:.0f} W per 910C). "
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


def rule(s: dict) -> str:
    """The batch rule, in words (emulator/analytic/batchrule.py)."""
    lo, hi = s.get("batch_range") or (s["global_batch"], s["global_batch"])
    return (f"Batch rule: both sides train about the same tokens per step: each plan's global batch is the "
            f"multiple of its data-parallel degree nearest {s['global_batch']:,} samples, within "
            f"+-{100 * s.get('batch_tolerance', 0):g}% ({lo:,} to {hi:,} samples), the micro-batch and gradient "
            "accumulation chosen freely by the search; throughput is compared per token, so every device count "
            "has plans and the curve has no sawtooth from divisibility.")


def _precision(r: dict) -> str:
    p = r.get("precision") or {"fast": "bf16", "slow": "bf16"}
    return f"{p['fast'].upper()} / {p['slow'].upper()}"


def _answer(s: dict) -> list[str]:
    T = s["train_tokens"]
    lines = ["## The answer", "",
             "| workload (target tokens per step) | precision, fast / slow | fast system | best plan | tokens/s "
             "(emulated) | break-even 910C (emulated) | best plan there (global batch, samples) | tokens/s "
             "(emulated) | one device fewer (emulated tokens/s) | "
             f"naive count (FLOPS ratio, catalog) | days to train {T:.3g} tokens, fast / slow (emulated) | "
             "J per token, fast / slow (emulated, all-in) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in s["workloads"]:
        for r in run["breakeven"]:
            f, sl, b = r["fast"], r["slow"], r["below"]
            head = (f"| {run['workload']} ({run['tokens_per_step']:,}) | {_precision(r)} | {r['racks']} x NVL72 "
                    f"({f['devices']} B200) | {f['plan']} | {f['tokens_per_s']:,.0f} |")
            if not sl:
                lines.append(f"{head} not reached up to {s['max_devices']} | - | - | - | {r['naive']:.0f} | "
                             f"{f['days_to_train']:.1f} / - | {f['energy_per_token_j']:.2f} / - |")
                continue
            lines.append(f"{head} **{r['devices']}** ({sl['domains']} domain(s)) | {sl['plan']} "
                         f"({sl.get('global_batch') or s['global_batch']:,}) | {_tps(sl)} | "
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
            f"ratio alone (precision, fast / slow: {_precision(r)}); one device fewer, {r['below']['devices']}, "
            f"{'falls short' if r['below']['plan'] else 'has no plan that fits in memory'}. They spend "
            f"{sl['energy_per_token_j'] / f['energy_per_token_j']:.2f}x the energy per token (emulated, all-in "
            f"power) and train {s['train_tokens']:.3g} tokens in {sl['days_to_train']:.1f} days against "
            f"{f['days_to_train']:.1f}.")
        more = [x for x in run["breakeven"][1:] if x["slow"] and x.get("precision") == r.get("precision")]
        if more:
            lines[-1] += " With more racks (joined by the B200's scale-out, as the catalog gives it): " + "; ".join(
                f"{x['racks']} x NVL72 ({x['fast']['tokens_per_s'] / f['tokens_per_s']:.2f}x one rack's tokens/s, "
                f"best plan at {x['fast']['memory_gb']:.0f} of {x['fast']['hbm_gb']:.0f} GB) are matched by "
                f"{x['devices']} 910C ({x['devices'] / s['slow']['domain']:.2f} {s['slow']['name']})"
                for x in more) + (f"; one rack's best plan holds {f['memory_gb']:.0f} of {f['hbm_gb']:.0f} GB per "
                                  "B200: memory, not compute, shapes its plan, so more racks scale better than "
                                  "linearly." if any(x["fast"]["tokens_per_s"] > 1.05 * x["racks"] * f["tokens_per_s"]
                                                     for x in more) else ".")
        lines += _best_precision(run, r)
        lines.append("")
    lines += ["", "The search scans every device count in ascending order from the count that would match if every "
              "model FLOP ran at the 910C's best-shape GEMM rate (no count below it can), so each answer is the "
              "smallest matching count under the batch rule; the plot shows the slow side's best plan at every "
              "count it searched. What divisibility is left is the plan space's, not the batch's: on a MoE, "
              "expert parallelism must divide both dp and the number of experts (256 on deepseek-v3, a power of "
              "two), so an odd count runs no expert parallelism and falls well below its even neighbours (the "
              "teeth of the deepseek-v3 curve)."]
    return lines


def _best_precision(run: dict, base: dict) -> list[str]:
    """A sentence on the best-precision row of the first rack, beside the BF16 answer."""
    other = next((x for x in run["breakeven"] if x.get("precision") != base.get("precision")
                  and x["racks"] == base["racks"]), None)
    if not other:
        return []
    f, sl, p = other["fast"], other["slow"], other["precision"]
    if not sl:
        return [f"With the B200 in {p['fast'].upper()} ({f['tokens_per_s']:,.0f} emulated tokens/s) no count of "
                f"910C in {p['slow'].upper()} matches up to the largest count searched."]
    gain = f["tokens_per_s"] / base["fast"]["tokens_per_s"]
    return [f"Each side at its best precision (B200 in {p['fast'].upper()}, 910C in {p['slow'].upper()}): one "
            f"NVL72 trains {f['tokens_per_s']:,.0f} emulated tokens/s ({gain:.2f}x its BF16 rate, {f['plan']}), "
            f"matched by **{other['devices']}** 910C "
            f"({sl['tokens_per_s']:,.0f} with {sl['plan']})."]


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
             + " | MFU, full attention (emulated %) | MFU, causal (emulated %) | peak memory / HBM (GB per device, "
             "emulated) |",
             "|---|---|---|---|---|---|" + "---|" * len(PARTS) + "---|---|---|"]
    for run in s["workloads"]:
        for name, p in _systems(s, run):
            bd = p["breakdown"]
            lines.append(f"| {run['workload']} | {name} | {p['devices']} | {p['plan']} | {p['micro_batch']} | "
                         f"{p['step_s']:.2f} | " + " | ".join(f"{bd[k]:.2f}" for k, _ in PARTS)
                         + f" | {100 * p['mfu']:.1f} | {_pct(p.get('mfu_causal'))} | {p['memory_gb']:.0f} / "
                         f"{p['hbm_gb']:.0f} |")
    lines += ["", "MFU is model FLOPs per second over the BF16 peak (also for the FP8 rows). Full attention counts "
              "the whole s x s score square (Relay's convention, workloads/analytic.py); causal halves the "
              "attention term, as a causal mask skips about half of it (FlashAttention's benchmarks count "
              "it so): the same step, a smaller count of model FLOPs."]
    return lines


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _systems(s: dict, run: dict) -> list:
    """(label, point) for the breakdown: the fast system, the slow side at break-even, the full slow
    system (when searched)."""
    r = run["breakeven"][0]
    out = [(f"{s['fast']['name']} ({r['racks']} rack)", r["fast"])]
    if r["slow"]:
        out.append(("910C at break-even", r["slow"]))
    best = next((x for x in run["breakeven"]
                 if x.get("precision") != r.get("precision") and x["racks"] == r["racks"]), None)
    if best:
        name = f"{s['fast']['name']} ({best['racks']} rack, {best['precision']['fast'].upper()})"
        out.insert(1, (name, best["fast"]))
    full = _full(run, s["slow"]["devices"])
    if full and (not r["slow"] or full["devices"] != r["slow"]["devices"]):
        out.append((f"{s['slow']['name']} (full)", full))
    return out


def _mfu(s: dict) -> list[str]:
    lines = ["", "## MFU against published training runs", "",
             "Like with like: each published MFU is set beside Relay's in the same convention for "
             "attention's model FLOPs (the row's; causal unless it says otherwise) and against the same "
             "peak.", "",
             "| reference | published MFU (convention) | Relay's figure (emulated, same convention and peak) | "
             "how far, and why |", "|---|---|---|---|"]
    by = {run["workload"]: run for run in s["workloads"]}
    for m in mfus():
        run = next((r for w, r in by.items() if ("deepseek" in w or "mixtral" in w) == (m["compare"] == "moe")),
                   None)
        if not run:
            continue
        pts = _systems(s, run)
        conv = m.get("convention", "full")
        key = "mfu_causal" if conv == "causal" else "mfu"
        # against the FP8 peak: the FP8 rows only (the B200's FP8 peak is twice its BF16 one)
        pts = [(n, p) for n, p in pts if ("FP8" in n) == (m["dtype"] == "fp8")] or pts
        scale = 0.5 if m["dtype"] == "fp8" else 1.0
        ours = "; ".join(f"{name}: {100 * scale * (p.get(key) or p['mfu']):.1f}% "
                         f"({_far(100 * scale * (p.get(key) or p['mfu']), m['low'], m['high'])})" for name, p in pts)
        lines.append(f"| {m['what']} ({m['source']}) | {m['low']}-{m['high']}% of the {m['dtype'].upper()} peak, "
                     f"{conv} attention (published; convention {m.get('convention_source', 'as stated')}) | "
                     f"{run['workload']}: {ours} | {_why(m, pts)} |")
    return lines


def _far(v: float, lo: float, hi: float) -> str:
    v = round(v, 1)  # as printed
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
        return ("Same model and precision (FP8, against the FP8 peak) on another chip (H100, whose best FP8 "
                "GEMM reaches a measured 0.71 of peak, the B200's 0.72: Relay's 0.75 and 0.76 before the shape's "
                f"quantisation). {STEADY}.")
    if m["compare"] == "moe":
        pipe = max(pts, key=lambda x: x[1]["breakdown"]["pipeline"] / x[1]["step_s"])
        a2a = max(pts, key=lambda x: x[1]["breakdown"]["expert_all_to_all"] / x[1]["step_s"])
        where = (f"the plan is pipeline-bound: {pipe[0]} spends {pipe[1]['breakdown']['pipeline']:.1f} of "
                 f"{pipe[1]['step_s']:.1f} emulated s in the bubble and p2p, and its expert all-to-alls are exposed"
                 if pipe[1]["breakdown"]["pipeline"] > 0 else
                 f"its expert all-to-alls are exposed: {a2a[0]} spends {a2a[1]['breakdown']['expert_all_to_all']:.1f} "
                 f"of {a2a[1]['step_s']:.1f} emulated s in them")
        return (f"Another chip (910B-class, not the 910C), a 718B MoE on thousands of NPUs with real routing "
                "imbalance; Relay's MoE has balanced routing, which flatters it. Where Relay is at the bottom, "
                f"{where}; {STEADY}.")
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
