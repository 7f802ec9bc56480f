"""Break-even at full scale, on the analytic plan search (emulator/analytic/planner.py): the
smallest number of slow devices whose BEST plan trains as many tokens per emulated second as the
fast system's best plan, both at the same global batch (samples of the workload's sequence
length, so the same tokens per step on both sides). No device runs: each device count costs one
`planner.search` (block costs measured on fake tensors once, cached; then arithmetic).

Slow systems of n devices are the slow preset scaled to n: one scale-up domain up to the preset's
domain (384 for a CloudMatrix 384), beyond it several domains joined by the chip's scale-out
(System.scaled). At a fixed global batch only some counts have a plan at all (dp must divide the
batch, tp and pp the model), and throughput is not monotone in the count (on 1,152 samples 256
910C cannot run dp = 256 and do worse per device than 288, which run dp = 288). So the search
works on the CANDIDATES (counts with at least one valid plan) and scans them rather than bisects:
from a lower bound, every candidate in ascending order until one matches. The bound is the count
that would match at 100% MFU (the fast plan's tokens per second x model FLOPs per token / one slow
chip's peak): no plan beats its chips' peak, so no count below it can match, and the answer is
exactly the smallest matching count. It is cheap: a count with few valid plans (most of them:
253 devices allow dp = 11 x pp = 23 only) costs milliseconds, a count with many a few seconds.

Sensitivity (RANGES): one uncertain input of the slow side moved by a factor, the break-even
searched again from the main answer. The chip's figures move through a variant chip registered
under its own name (chips.register), so the planner's cached block measurements are redone on
it; the links through the System's own fields, which the fabric model reads.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, replace

from relay.analytic import planner, skew
from relay.hardware import chips
from relay.hardware.system import System


@dataclass(frozen=True)
class Point:
    """One system's best plan (None: nothing fits in memory) at the global batch."""

    system: System
    best: planner.PlanResult | None
    host_s: float  # real seconds the search took (0 when it came from the cache)
    others: tuple = ()  # the best plan of each other expert-parallel degree (uncertainty.py's alternatives)

    @property
    def devices(self) -> int:
        return self.system.devices

    @property
    def tokens_per_s(self) -> float:
        """Emulated tokens per second of the best plan (0 when none fits)."""
        return self.best.tokens_per_s if self.best else 0.0

    @property
    def energy_per_token_j(self) -> float | None:
        """Emulated J per token at the system's power (all-in for the presets); None: unknown."""
        w = self.system.total_power_w
        return w / self.tokens_per_s if w and self.tokens_per_s else None


@dataclass(frozen=True)
class BreakEven:
    """The smallest slow count whose best plan matches the fast system's best plan."""

    workload: str
    global_batch: int  # samples per step, on both sides
    fast: Point
    devices: int | None  # the answer; None: no count up to max_devices matches
    slow: Point | None  # the slow system's best plan at the answer
    below: Point | None  # the largest candidate below the answer (searched, falls short)
    points: tuple  # every slow Point searched, by device count
    naive: float  # fast peak FLOPS / one slow chip's peak: the count from the FLOPS ratio alone
    host_s: float  # real seconds the whole search took


@functools.cache
def best(system: System, workload: str, global_batch: int, routing: str | None = None) -> Point:
    """The best plan of `workload` on `system` (cached: a sensitivity case and the plot's curve
    reuse the break-even's searches); routing: a MoE routing model's text (skew.py), None balanced."""
    start = time.perf_counter()
    found = skew.search(system, workload, global_batch, routing, top=10**9)  # every plan is costed anyway
    others = {}
    for r in found.results[1:]:
        if r.plan.ep != found.results[0].plan.ep:
            others.setdefault(r.plan.ep, r)
    return Point(system, found.results[0] if found.results else None, time.perf_counter() - start,
                 tuple(others.values()))


_CANDIDATES = {}  # (domain, workload, global batch, max devices) -> candidates


def candidates(slow: System, workload: str, global_batch: int, max_devices: int) -> tuple:
    """Device counts up to max_devices with at least one valid plan (memory not checked). Which
    plans are valid depends on the counts and the domain only, not the chip's figures: cached so."""
    key = (slow.domain, workload, global_batch, max_devices)
    if key not in _CANDIDATES:
        _CANDIDATES[key] = tuple(n for n in range(1, max_devices + 1)
                                 if next(planner.plans(slow.scaled(n), workload, global_batch), None) is not None)
    return _CANDIDATES[key]


def breakeven(fast: System, slow: System, workload: str, global_batch: int, max_devices: int,
              routing: str | None = None) -> BreakEven:
    """The smallest slow count up to max_devices whose best plan matches the fast system's (the
    scan in the module docstring), both sides routed by `routing` (None: balanced)."""
    start = time.perf_counter()
    target = best(fast, workload, global_batch, routing)
    naive = fast.peak_flops / slow.chip.peak_flops()
    cands = candidates(slow, workload, global_batch, max_devices)
    seen = {}

    def at(n: int) -> Point:
        if n not in seen:
            seen[n] = best(slow.scaled(n), workload, global_batch, routing)
        return seen[n]

    answer = None
    if target.best is not None:
        # model FLOPs per step / the fast system's peak = mfu x step: the slow peak must cover it
        bound = target.best.mfu * naive
        answer = next((n for n in cands if n >= math.floor(bound) and at(n).tokens_per_s >= target.tokens_per_s),
                      None)
    smaller = [c for c in cands if answer and c < answer]
    below = at(smaller[-1]) if smaller else None
    points = tuple(seen[k] for k in sorted(seen))
    return BreakEven(workload, global_batch, target, answer, seen.get(answer), below, points, naive,
                     time.perf_counter() - start)


def curve(slow: System, workload: str, global_batch: int, counts) -> list:
    """Best plans at these slow device counts (for the plot), the nearest candidate to each."""
    top = max(counts)
    cands = candidates(slow, workload, global_batch, top)
    ns = sorted({min(cands, key=lambda c: (abs(c - n), c)) for n in counts})
    return [best(slow.scaled(n), workload, global_batch) for n in ns]


@dataclass(frozen=True)
class Range:
    """An uncertain input of the slow side and the factors it is moved by."""

    parameter: str  # matmul_eff (the chip's GEMM efficiency), scaleup_gbps, scaleup_latency_us
    what: str  # in words, for the table
    low: float  # factor on the catalog figure
    high: float
    why: str


RANGES = (
    Range("matmul_eff", "910C GEMM efficiency (fraction of peak)", 0.8, 1.2,
          "the catalog's 0.846 is a 910B2 die's 4096^3 GEMM; the 910C's two dies at training shapes unmeasured"),
    Range("mem_eff", "910C HBM efficiency (fraction of bandwidth)", 0.8, 1.2,
          "no published streaming-kernel figure for the 910C; the default 0.8"),
    Range("scaleup_gbps", "scale-up (UB) bandwidth per device", 0.8, 1.2,
          "UB's collective efficiency is an estimate (fabrics.toml: 0.8, no measured collective)"),
    Range("scaleup_latency_us", "scale-up (UB) latency per message", 0.8, 1.2,
          "an estimate (catalog); Huawei claims under 1 us between nodes"),
)


def vary(system: System, r: Range, factor: float) -> System:
    """`system` with one input multiplied by `factor`. A chip figure goes through a variant chip
    registered under its own name, so the planner's caches (keyed by chip name) measure it anew."""
    if r.parameter in ("scaleup_gbps", "scaleup_latency_us"):
        return replace(system, **{r.parameter: getattr(system, r.parameter) * factor})
    value = min(getattr(system.chip, r.parameter) * factor, 1.0)
    chip = system.chip.replace(name=f"{system.chip.name}@{r.parameter}={value:g}", **{r.parameter: value})
    chips.register(chip)
    return replace(system, chip=chip.name)


def sensitivity(base: BreakEven, slow: System, max_devices: int, ranges=RANGES) -> dict:
    """The break-even again with each range's low and high factor on the slow side (a dict for
    summary.json)."""
    start = time.perf_counter()
    rows = []
    for r in ranges:
        row = {"parameter": r.parameter, "what": r.what, "why": r.why, "low": r.low, "high": r.high,
               "catalog": getattr(slow.chip, r.parameter, None) if r.parameter.endswith("_eff")
               else getattr(slow, r.parameter)}
        for end in ("low", "high"):
            res = breakeven(base.fast.system, vary(slow, r, getattr(r, end)), base.workload, base.global_batch,
                            max_devices)
            row[f"{end}_devices"] = res.devices
        rows.append(row)
    return {"base_devices": base.devices, "rows": rows, "host_s": time.perf_counter() - start}
