"""Break-even at full scale, on the analytic plan search (emulator/analytic/planner.py): the
smallest number of slow devices whose BEST plan trains as many tokens per emulated second as the
fast system's best plan, both under one batch rule (about the same tokens per step; below). No
device runs: each device count costs about one plan search (block costs measured on fake tensors
once, cached; then arithmetic).

Slow systems of n devices are the slow preset scaled to n: one scale-up domain up to the preset's
domain (384 for a CloudMatrix 384), beyond it several domains joined by the chip's scale-out
(System.scaled). Both sides train under the batch rule of batchrule.py: about the same tokens per
step (each plan's global batch the multiple of its dp nearest the target, within +-tolerance; the
micro-batch and the accumulation free), compared per token, so every count has plans and the
throughput curve has no sawtooth from divisibility. Throughput is still not strictly monotone in
the count (a prime count has fewer plans), so the search scans rather than bisects: from a lower
bound, every count in ascending order until one matches. The bound is the count that would match
if every model FLOP ran at the slow chip's best-shape GEMM efficiency (its peak x matmul_eff; x
fp8_eff at the FP8 peak when the slow side runs FP8): the cost model charges no GEMM or attention
kernel faster than that, so no count below it can match, and the answer is exactly the smallest
matching count (tests/unit/test_fullscale.py checks it against every count). A count with few
plans costs milliseconds, one with many a few seconds.

Precision: each side runs its own (`fast_dtype`, `slow_dtype`: bf16 or fp8 where the chip has an
FP8 peak), through the planner's dtype; MFU stays against the BF16 peak.

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

from relay.analytic import batchrule, planner
from relay.hardware import chips
from relay.hardware.system import System


@dataclass(frozen=True)
class Point:
    """One system's best plan (None: nothing fits in memory) at the global batch."""

    system: System
    best: planner.PlanResult | None
    host_s: float  # real seconds the search took (the first time: a cached Point keeps it)
    others: tuple = ()  # the best plan of each other expert-parallel degree (uncertainty.py's alternatives)

    @property
    def devices(self) -> int:
        return self.system.devices

    @property
    def tokens_per_s(self) -> float:
        """Emulated tokens per second of the best plan (0 when none fits)."""
        return self.best.tokens_per_s if self.best else 0.0

    @property
    def global_batch(self) -> int | None:
        """Samples per step the best plan trains (the batch rule's multiple of its dp)."""
        b = self.best
        return b.plan.dp * b.plan.n_microbatches * b.micro_batch if b else None

    @property
    def energy_per_token_j(self) -> float | None:
        """Emulated J per token at the system's power (all-in for the presets); None: unknown."""
        w = self.system.total_power_w
        return w / self.tokens_per_s if w and self.tokens_per_s else None


@dataclass(frozen=True)
class BreakEven:
    """The smallest slow count whose best plan matches the fast system's best plan."""

    workload: str
    global_batch: int  # the target samples per step (each plan trains the rule's multiple of its dp)
    fast: Point
    devices: int | None  # the answer; None: no count up to max_devices matches
    slow: Point | None  # the slow system's best plan at the answer
    below: Point | None  # the largest candidate below the answer (searched, falls short)
    points: tuple  # every slow Point searched, by device count
    naive: float  # fast peak FLOPS / one slow chip's peak: the count from the FLOPS ratio alone
    host_s: float  # real seconds the whole search took
    tolerance: float = batchrule.TOLERANCE  # the batch rule's, a fraction of global_batch
    fast_dtype: str = "bf16"  # the precision each side trains in
    slow_dtype: str = "bf16"


def best(system: System, workload: str, global_batch: int, tolerance: float = batchrule.TOLERANCE,
         dtype: str = "bf16", routing: str | None = None) -> Point:
    """The best plan of `workload` on `system` under the batch rule (cached: a sensitivity case,
    the goodput scan, the range and the plot's curve reuse the break-even's searches); routing: a
    MoE routing model's text (skew.py), None balanced."""
    return _best(system, workload, global_batch, tolerance, dtype, routing)


@functools.cache
def _best(system: System, workload: str, global_batch: int, tolerance: float, dtype: str, routing) -> Point:
    """`best`, cached on every argument positionally (however a caller passes them)."""
    found = batchrule.best(system, workload, global_batch, tolerance, dtype, routing)
    return Point(system, found.result, found.host_s, found.others)


def lower_bound(target: Point, slow: System, dtype: str = "bf16") -> int:
    """No count of `slow` below this can match `target`: the count whose every model FLOP at the
    slow chip's best-shape GEMM rate gives the target's tokens per second (module docstring)."""
    b = target.best
    flops_per_token = b.mfu * target.system.peak("bf16") / b.tokens_per_s  # (MFU is against the BF16 peak)
    chip = slow.chip
    rate = chip.peak_flops("bf16") * chip.matmul_eff
    if dtype == "fp8":
        rate = max(rate, chip.peak_flops("fp8") * chip.fp8_eff)
    return max(math.floor(target.tokens_per_s * flops_per_token / rate), 1)


def breakeven(fast: System, slow: System, workload: str, global_batch: int, max_devices: int,
              tolerance: float = batchrule.TOLERANCE, fast_dtype: str = "bf16", slow_dtype: str = "bf16",
              routing: str | None = None) -> BreakEven:
    """The smallest slow count up to max_devices whose best plan matches the fast system's (the
    scan in the module docstring), each side in its own precision, both routed by `routing`
    (None: balanced)."""
    start = time.perf_counter()
    batchrule.check(global_batch, tolerance)
    for chip, dtype in [(c, fast_dtype) for c in fast.chips] + [(slow.chip, slow_dtype)]:
        chip.peak_flops(dtype)  # a precision the chip lacks: refused before any search
    target = best(fast, workload, global_batch, tolerance, fast_dtype, routing)
    naive = fast.peak_flops / slow.chip.peak_flops()
    seen = {}

    def at(n: int) -> Point:
        if n not in seen:
            seen[n] = best(slow.scaled(n), workload, global_batch, tolerance, slow_dtype, routing)
        return seen[n]

    answer = None
    if target.best is not None:
        answer = next((n for n in range(lower_bound(target, slow, slow_dtype), max_devices + 1)
                       if at(n).tokens_per_s >= target.tokens_per_s), None)
    below = at(answer - 1) if answer and answer > 1 else None
    points = tuple(seen[k] for k in sorted(seen))
    return BreakEven(workload, global_batch, target, answer, seen.get(answer), below, points, naive,
                     time.perf_counter() - start, tolerance, fast_dtype, slow_dtype)


def curve(slow: System, workload: str, global_batch: int, counts, tolerance: float = batchrule.TOLERANCE,
          dtype: str = "bf16") -> list:
    """Best plans at these slow device counts (for the plot), each count as it is."""
    return [best(slow.scaled(n), workload, global_batch, tolerance, dtype) for n in sorted(set(counts))]


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
                            max_devices, base.tolerance, base.fast_dtype, base.slow_dtype)
            row[f"{end}_devices"] = res.devices
        rows.append(row)
    return {"base_devices": base.devices, "rows": rows, "host_s": time.perf_counter() - start}
