"""The full-scale break-even's risks (issue 28 items 4-6), beside the point answer: routing skew
on both sides (analytic/skew.py), the break-even on goodput (analytic/goodput.py) and the answer
as a distribution over the uncertain inputs (analytic/uncertainty.py); their summary.json fields
and summary.md sections. Every figure emulated, every input's range with its reason."""

from __future__ import annotations

import time

from relay.analytic import fullscale, goodput, skew, uncertainty
from relay.analytic.footprint import config_of
from relay.errors import ConfigError

SKEWS = ("zipf:0.1", "zipf:0.2", "zipf:0.3")  # routing shown for each side's chosen plan
SEARCHED_SKEW = "zipf:0.2"  # the break-even searched again under this routing (MoE workloads)


def check(args) -> None:
    """--uncertainty and --routing refused before any search (ConfigError naming the flag)."""
    n = getattr(args, "uncertainty", None)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ConfigError(f"--uncertainty = {n!r} is invalid; give a number of samples >= 0 (e.g. 2000; 0: off)")
    routing = getattr(args, "routing", None)
    if skew.parse(routing) is not None:
        raise ConfigError(f"--routing = {routing!r}: the full-scale break-even answers with balanced routing and "
                          f"shows skew beside it (each side's plan under {', '.join(SKEWS)} and the answer searched "
                          f"again under {SEARCHED_SKEW}; skew is one of the range's inputs); drop --routing, or use "
                          "`relay plan --routing` for one system")


def extras(be: fullscale.BreakEven, slow, workload: str, batch: int, max_devices: int, curve: list,
           samples: int) -> dict:
    """summary.json's fields for one workload's first break-even `be` (one fast preset)."""
    out = {}
    if be.fast.best is None:
        return out
    c = config_of(workload)
    if hasattr(c, "n_experts") and be.slow:
        out["routing"] = routing_effect(be, slow, workload, batch, max_devices, c)
        print(f"# {workload}: routing skew, {out['routing']['host_s']:.0f} s real", flush=True)
    missing = sorted({c.name for c in (*be.fast.system.chips, slow.chip)} - set(goodput.rates()))
    if missing:  # goodput and the range need each chip's interruption rate
        out["not_rated"] = missing
        print(f"# {workload}: no goodput break-even or range: no interruption rate for {', '.join(missing)} "
              "(hardware/reliability.toml)", flush=True)
        return out
    start = time.perf_counter()
    out["goodput"] = {**goodput.breakeven(be.fast, slow, workload, batch, max_devices, tolerance=be.tolerance,
                                          slow_dtype=be.slow_dtype),
                      "throughput_devices": be.devices, "host_s": 0.0}
    out["goodput"]["host_s"] = time.perf_counter() - start
    print(f"# {workload}: goodput break-even {out['goodput']['devices']}, "
          f"{out['goodput']['host_s']:.0f} s real", flush=True)
    if samples and be.devices:
        out["uncertainty"] = uncertainty.run(be, slow, curve, workload, max_devices, n=samples)
        u = out["uncertainty"]
        print(f"# {workload}: {samples} samples, {u['prepare_s']:.0f} s to prepare, {u['host_s']:.1f} s to "
              "sample (real)", flush=True)
    return out


def routing_effect(be, slow, workload: str, batch: int, max_devices: int, c) -> dict:
    """Each side's chosen plan costed under SKEWS (no search: the hottest device's factor and
    tokens/s), and the break-even searched again under SEARCHED_SKEW."""
    start = time.perf_counter()
    rows = []
    for label, p, dtype in (("fast", be.fast, be.fast_dtype), ("slow", be.slow, be.slow_dtype)):
        plan, mb = p.best.plan, p.best.micro_batch
        for r in SKEWS:  # at the batch the plan trains (the batch rule's multiple of its dp)
            res = skew.cost(p.system, workload, plan, p.global_batch, r, p.best.memory, dtype=dtype)
            f = max(skew.hot_factors(skew.parse(r), c, plan.ep, mb * c.seq_len * c.top_k)) if plan.ep > 1 else 1.0
            rows.append({"side": label, "devices": p.devices, "plan": str(plan), "ep": plan.ep, "routing": r,
                         "hot_factor": f, "tokens_per_s": res.tokens_per_s, "balanced_tokens_per_s": p.tokens_per_s})
    again = fullscale.breakeven(be.fast.system, slow, workload, batch, max_devices, be.tolerance, be.fast_dtype,
                                be.slow_dtype, routing=SEARCHED_SKEW)
    return {"rows": rows, "searched": SEARCHED_SKEW, "devices": again.devices, "balanced_devices": be.devices,
            "fast_plan": str(again.fast.best.plan) if again.fast.best else None,
            "fast_tokens_per_s": again.fast.tokens_per_s,
            "slow_plan": str(again.slow.best.plan) if again.slow else None,
            "slow_tokens_per_s": again.slow.tokens_per_s if again.slow else None, "host_s": time.perf_counter() - start}


def _n(v) -> str:
    return "not reached" if v is None else f"{v}"


def summary_md(s: dict) -> list[str]:
    """summary.md's sections on routing skew, goodput and the range of the answer."""
    runs = s["workloads"]
    lines = []
    if any(r.get("uncertainty") for r in runs):
        lines += ["", "## The answer as a range (emulated)", "",
                  "The break-even 910C count against one NVL72 when every uncertain input is drawn from its range "
                  "at once (seeded; uniform, rates log-uniform), on throughput and on goodput. Each sample rescales "
                  "the best plans the search found (compute by each chip's GEMM and HBM efficiency through shares "
                  "measured on variant chips, communication by link efficiency, MoE skew from the planner's skew "
                  "terms) and takes the smallest searched count that matches: no plan is searched again, so a "
                  "sample's answer is an upper bound (another plan might do better) at the resolution of the "
                  "searched counts.", "",
                  "| workload | break-even on | point (central inputs) | median | 10th-90th percentile | samples not "
                  "reached | samples (real s to prepare + sample) |", "|---|---|---|---|---|---|---|"]
        for run in runs:
            u = run.get("uncertainty")
            if not u:
                continue
            for kind in ("throughput", "goodput"):
                d = u[kind]
                lines.append(f"| {run['workload']} | {kind} | {_n(d['point'])} | **{_n(d['p50'])}** | {_n(d['p10'])}-"
                             f"{_n(d['p90'])} | {100 * d['not_reached']:.0f}% | {u['samples']} (seed {u['seed']}; "
                             f"{u['prepare_s']:.0f} + {u['host_s']:.1f} s) |")
        lines += ["", "Which input moves it most (tornado, `uncertainty_tornado.png`): each input alone at the ends "
                  "of its range, the others central; break-even on throughput.", "",
                  "| workload | input | at its low end | at its high end | why uncertain |", "|---|---|---|---|---|"]
        for run in runs:
            u = run.get("uncertainty")
            for r in (u["throughput"]["tornado"] if u else []):
                lines.append(f"| {run['workload']} | {r['what']} | {_n(r['at_low'])} | {_n(r['at_high'])} | "
                             f"{r['why']} |")
    lines += _routing(runs) + _goodput(runs)
    missing = sorted({c for r in runs for c in r.get("not_rated", ())})
    if missing:
        lines += ["", f"No goodput break-even and no range: hardware/reliability.toml has no interruption rate for "
                  f"{', '.join(missing)} (add a sourced row)."]
    return lines


def _routing(runs) -> list[str]:
    rs = [r for r in runs if r.get("routing")]
    if not rs:
        return []
    lines = ["", "## Routing skew (emulated)", "",
             "Each side's chosen plan with a Zipf router (expert i gets a share 1 / (i + 1)^s; the hottest experts "
             "all on one device, the worst placement): the busiest expert-parallel device receives f times the "
             "balanced share and sets the step (skew.py); the wider the expert-parallel group (ep in the plan), the "
             "larger f for the same router. Then the break-even searched again under one router, where each side "
             "may pick another plan (a lower ep).", "",
             "| workload | side | plan | routing | busiest device / balanced (f) | tokens/s (emulated) | "
             "of balanced |", "|---|---|---|---|---|---|---|"]
    for run in rs:
        for r in run["routing"]["rows"]:
            lines.append(f"| {run['workload']} | {'NVL72' if r['side'] == 'fast' else '910C'} ({r['devices']}) | "
                         f"{r['plan']} | {r['routing']} | {r['hot_factor']:.2f} | {r['tokens_per_s']:,.0f} | "
                         f"{r['tokens_per_s'] / r['balanced_tokens_per_s']:.2f}x |")
        g = run["routing"]
        lines += ["", f"Searched again with {g['searched']} routing on both sides, {run['workload']}'s break-even is "
                  f"**{_n(g['devices'])}** 910C (balanced: {_n(g['balanced_devices'])}); best plans "
                  f"{g['fast_plan']} ({g['fast_tokens_per_s']:,.0f} tokens/s) against {g['slow_plan']} "
                  f"({(g['slow_tokens_per_s'] or 0):,.0f}); {g['host_s']:.0f} s real."]
    return lines


def _goodput(runs) -> list[str]:
    gs = [r for r in runs if r.get("goodput")]
    if not gs:
        return []
    lines = ["", "## Goodput at scale (emulated, with published failure rates)", "",
             "Both sides interrupted at a rate per device (a synchronous job stops when any device does): "
             "checkpoints every Daly-optimal interval, the state (bf16 weights and AdamW's fp32 state) written "
             f"and read at {goodput.STORAGE_GBPS:,.0f} GB/s, {goodput.RESTART_S / 60:.0f} minutes to restart "
             "besides; goodput = useful share of wall time (analytic/goodput.py).", "",
             "| workload | side | devices | interruptions per device-hour | hours between interruptions | "
             "checkpoint (s) | interval (Daly, min) | goodput | tokens/s x goodput (emulated) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in gs:
        g = run["goodput"]
        for label, x in (("NVL72", g["fast"]), ("910C", g["slow"])):
            if x:
                lines.append(f"| {run['workload']} | {label} | {x['devices']} | {x['per_device_hour']:.2g} | "
                             f"{x['mtbf_h']:.1f} | {x['checkpoint_s']:.1f} | {x['interval_s'] / 60:.0f} | "
                             f"{100 * x['fraction']:.1f}% | {x['goodput_tokens_per_s']:,.0f} |")
        lines.append(f"| {run['workload']} | **break-even** | throughput **{_n(g['throughput_devices'])}**, "
                     f"goodput **{_n(g['devices'])}** | | | | | | |")
    lines += ["", "Rates: " + "; ".join(f"{k}: {v.source}" for k, v in goodput.rates().items())]
    return lines
