"""`relay breakeven` at full scale: a full-size language model as --workload (llama3-70b,
deepseek-v3, ...; several comma-separated), or --plan-search with any language model. Each
side runs its best plan from the analytic plan search (emulator/analytic/fullscale.py): no device
starts. Prints the break-even table and writes the results folder (summary.json, summary.md,
the plots)."""

from __future__ import annotations

import math
import time

from tabulate import tabulate

from relay.analytic import batchrule, fullscale
from relay.analytic.footprint import GB, config_of
from relay.errors import ConfigError
from relay.hardware.system import PRESETS, System
from relay.launch import fullscale_risk
from relay.launch.fullscale_summary import summary_md
from relay.launch.options import as_list
from relay.results.folder import ResultsDir, environment, system_dict
from relay.results.fullscale_plots import draw
from relay.results.risk_plots import draw as draw_risks
from relay.workloads.analytic import causal_share

FULL_SIZE = ("llama3-8b", "llama3-70b", "llama3-405b", "deepseek-v3", "mixtral-8x7b")
GLOBAL_BATCH = 1152  # target samples per step on both sides (default; each plan's: batchrule.py)
TRAIN_TOKENS = 1e12  # "time to train T tokens" (default T)
CURVE_STEP = 48  # the plot's slow device counts: every 48 up to the largest searched


def wanted(args) -> bool:
    """The analytic break-even: asked for, or every workload a full-size language model."""
    names = as_list(args.workload)
    return bool(getattr(args, "plan_search", None)) or (bool(names) and all(n in FULL_SIZE for n in names))


def point_dict(p: fullscale.Point, train_tokens: float, workload: str | None = None) -> dict:
    b = p.best
    out = {"devices": p.devices, "domain": p.system.domain, "domains": p.system.domains,
           "chip": p.system.chip.name, "power_w": p.system.total_power_w, "host_s": p.host_s,
           "tokens_per_s": p.tokens_per_s, "energy_per_token_j": p.energy_per_token_j}
    if b is None:
        return {**out, "plan": None}
    bd = b.breakdown
    causal = causal_share(config_of(workload)) if workload else None  # model FLOPs with causal attention / without
    return {**out, "plan": str(b.plan), "micro_batch": b.micro_batch, "global_batch": p.global_batch,
            "step_s": b.step_s, "mfu": b.mfu, "mfu_causal": b.mfu * causal if causal else None,
            "days_to_train": train_tokens / b.tokens_per_s / 86400,
            "breakdown": {"compute": bd.compute, "tensor_parallel": bd.tensor_parallel, "pipeline": bd.pipeline,
                          "expert_all_to_all": bd.expert_all_to_all, "data_parallel": bd.data_parallel},
            "memory_gb": b.memory.total / GB, "hbm_gb": b.memory.capacity / GB}


def _presets(args) -> tuple[System, System]:
    for flag, name in (("--fast", args.fast), ("--slow", args.slow)):
        if name not in PRESETS:
            raise ConfigError(f"{flag} = {name!r}: the full-scale break-even compares system presets "
                              f"({', '.join(PRESETS)}); give e.g. --fast nvl72 --slow cloudmatrix384")
    return System.preset(args.fast), System.preset(args.slow)


def cmd_fullscale(args) -> None:
    start = time.perf_counter()
    if getattr(args, "parallel", None):
        raise ConfigError(f"--parallel {args.parallel}: the full-scale break-even gives each device count its best "
                          "plan from the plan search, not a fixed one; drop --parallel (relay plan --parallel "
                          "costs one plan on one system)")
    fast, slow = _presets(args)
    fullscale_risk.check(args)
    workloads = as_list(args.workload)
    for w in workloads:
        config_of(w)  # refuses a workload that is not a language model, naming it
    batch = args.global_batch or GLOBAL_BATCH
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"--global-batch = {batch!r} is invalid; give samples per step >= 1")
    racks = as_list(args.racks or "1", int)
    if not racks or min(racks) < 1:
        raise ConfigError(f"--racks = {args.racks!r} is invalid; give fast systems to compare, e.g. 1,2,4")
    train_tokens = float(args.train_tokens or TRAIN_TOKENS)
    max_devices = args.max_devices or 4 * slow.devices
    tolerance = batchrule.TOLERANCE if getattr(args, "batch_tolerance", None) is None else args.batch_tolerance
    batchrule.check(batch, tolerance)
    precisions = precisions_of(getattr(args, "precisions", None), fast, slow)
    out = ResultsDir(args.out, args.name or f"fullscale-{fast.name}-vs-{slow.name}")
    runs = []
    for w in workloads:
        runs.append(_workload(w, fast, slow, batch, racks, max_devices, train_tokens, args.sensitivity, tolerance,
                              precisions, getattr(args, "routing", None), getattr(args, "uncertainty", None) or 0))
    summary = {"kind": "fullscale", "name": out.path.name, "fast": system_dict(fast), "slow": system_dict(slow),
               "global_batch": batch, "batch_tolerance": tolerance, "batch_range": _range(batch, tolerance),
               "precisions": [list(p) for p in precisions], "train_tokens": train_tokens,
               "max_devices": max_devices, "workloads": runs, "host_s": time.perf_counter() - start}
    out.write_json("config.json", {"command": "breakeven", "mode": "full scale (analytic plan search)",
                                   "options": {k: v for k, v in vars(args).items() if k != "fn"},
                                   **environment()})
    out.write_json("summary.json", summary)
    out.write_text("summary.md", summary_md(summary))
    draw(out, summary)
    draw_risks(out, summary)
    print(table(summary))
    lo, hi = summary["batch_range"]
    print(f"# every figure emulated (analytic plan search); global batch {batch} samples (each plan the multiple of "
          f"its dp nearest it, {lo} to {hi}) on both sides, compared per token; "
          f"time to train {train_tokens:.3g} tokens; all-in power of the presets")
    print(f"# took {summary['host_s']:.0f} s (real, this host); results: {out.path}")


def precisions_of(spec, fast: System, slow: System) -> list:
    """(fast dtype, slow dtype) pairs to answer for: "bf16" both sides in BF16, "best" each side at
    its best precision (FP8 where every chip of it has an FP8 peak, else BF16)."""
    names = as_list(spec or "bf16,best")
    bad = [n for n in names if n not in ("bf16", "best")]
    if bad or not names:
        raise ConfigError(f"--precisions = {spec!r} is invalid; give bf16, best or bf16,best")

    def top(system: System) -> str:
        return "fp8" if all(c.fp8_tflops is not None for c in system.chips) else "bf16"

    pairs = [("bf16", "bf16") if n == "bf16" else (top(fast), top(slow)) for n in names]
    return list(dict.fromkeys(pairs))  # "best" on two BF16 chips is the BF16 row


def _range(batch: int, tolerance: float) -> tuple:
    """The global batches the rule allows, samples (lowest, highest)."""
    return math.ceil(batch * (1 - tolerance) - 1e-9), math.floor(batch * (1 + tolerance) + 1e-9)


def _workload(w, fast, slow, batch, racks, max_devices, train_tokens, sensitivity,
              tolerance=batchrule.TOLERANCE, precisions=(("bf16", "bf16"),), routing=None, samples=0) -> dict:
    c = config_of(w)
    rows, scanned = [], {}  # every slow count a search looked at, for the plot
    for fd, sd in precisions:
        for k in racks if (fd, sd) == precisions[0] else racks[:1]:  # other precisions: one rack
            be = fullscale.breakeven(fast.scaled(k * fast.devices), slow, w, batch, max_devices, tolerance, fd, sd,
                                     routing)
            rows.append({"racks": k, "precision": {"fast": fd, "slow": sd}, "devices": be.devices,
                         "naive": be.naive, "host_s": be.host_s, "fast": point_dict(be.fast, train_tokens, w),
                         "slow": point_dict(be.slow, train_tokens, w) if be.slow else None,
                         "below": point_dict(be.below, train_tokens, w) if be.below else None})
            print(f"# {w}, {k} x {fast.name} ({fd}) against {slow.chip.name} ({sd}): {be.devices or 'not reached'} "
                  f"({len(be.points)} counts searched, {be.host_s:.0f} s real)", flush=True)
            if len(rows) == 1:
                first = be
            scanned.update({q.devices: q for q in be.points if sd == precisions[0][1]})
    top = max([r["devices"] or 0 for r in rows] + [slow.devices])
    counts = list(range(CURVE_STEP, top + 1, CURVE_STEP))
    sd = precisions[0][1]
    curve = fullscale.curve(slow, w, batch, counts, tolerance, sd) if counts else []
    curve = sorted({**scanned, **{q.devices: q for q in curve}}.values(), key=lambda q: q.devices)
    run = {"workload": w, "seq_len": c.seq_len, "tokens_per_step": batch * c.seq_len, "breakeven": rows,
           "curve": [point_dict(p, train_tokens, w) for p in curve],
           "fast_curve": [r["fast"] for r in rows if r["precision"] == rows[0]["precision"]]}
    if sensitivity and first.devices:
        run["sensitivity"] = fullscale.sensitivity(first, slow, max_devices)
        print(f"# {w}: sensitivity, {2 * len(fullscale.RANGES)} searches, {run['sensitivity']['host_s']:.0f} s real",
              flush=True)
    run.update(fullscale_risk.extras(first, slow, w, batch, max_devices, curve, samples))  # skew, goodput, range
    return run


def table(summary: dict) -> str:
    rows = []
    for run in summary["workloads"]:
        for r in run["breakeven"]:
            f, s = r["fast"], r["slow"]
            rows.append([run["workload"], f"{f['devices']} B200 ({r['racks']} x NVL72)" if summary["fast"]["name"] ==
                         "nvl72" else f"{f['devices']} {f['chip']}", f["plan"], f"{f['tokens_per_s']:,.0f}",
                         f"{100 * f['mfu']:.1f}",
                         r["devices"] or f"not reached (<= {summary['max_devices']})",
                         s["plan"] if s else "-", f"{s['tokens_per_s']:,.0f}" if s else "-",
                         f"{100 * s['mfu']:.1f}" if s else "-", f"{r['naive']:.0f}",
                         f"{f['days_to_train']:.1f} / {s['days_to_train']:.1f}" if s else "-",
                         f"{f['energy_per_token_j']:.2f} / {s['energy_per_token_j']:.2f}" if s else "-",
                         _below(r)])
    return tabulate(rows, headers=["workload", "fast system", "fast best plan", "fast tokens/s\n(emulated)",
                                   "fast MFU\n(emul. %)", "break-even\n910C devices", "slow best plan",
                                   "slow tokens/s\n(emulated)", "slow MFU\n(emul. %)", "naive\n(FLOPS ratio)",
                                   f"days to train {summary['train_tokens']:.3g} tokens\nfast / slow (emulated)",
                                   "J per token, fast / slow\n(emulated, all-in power)", "next count below"],
                    disable_numparse=True)


def _below(r: dict) -> str:
    b = r["below"]
    if not b:
        return "-"
    if not b["plan"]:
        return f"{b['devices']}: no plan fits in memory"
    return f"{b['devices']}: {b['tokens_per_s']:,.0f} tokens/s, falls short"
