"""The batch rule of the full-scale break-even (fullscale.py): both sides train about the same
tokens per step, at any device count.

A plan of data-parallel degree dp trains the multiple of dp NEAREST the target global batch (ties:
the smaller), taken only if it is within +-tolerance of the target (TOLERANCE, 12.5% by default); the
micro-batch size and the gradient accumulation (microbatches per replica) are the plan search's
free choice (accumulate.py). So every device count has plans (dp = 1 always takes the target
itself; with a prime count n, dp = n takes the multiple of n nearest the target), and no count is
shut out because its dp does not divide the batch: the throughput curve has no sawtooth from
divisibility. Plans of one count may train slightly different batches, so they are ranked, and
the two sides compared, per token: emulated tokens per second. With tolerance 0 the rule is the
fixed global batch (only a dp that divides the target).

Each distinct batch of a count is one pass of the plan search's loop (planner.search: memory by the
parameters alone, then by the measured blocks, then the emulated step), over only the plans whose
dp maps to that batch, so a count costs about one search whatever its number of batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from relay.analytic import planner, skew
from relay.analytic.footprint import fitting
from relay.errors import ConfigError
from relay.hardware.system import System

# The global batch may differ from the target by this fraction, either way. 12.5%: on 1,152 samples,
# 1,008 to 1,296, so every count from 202 to 324 runs dp = count at 4 or 5 samples per replica (the
# range of one NVL72's break-even; a tolerance of 1/9 is the least that closes the gap between 4 and
# 5 per replica); 1,008 at 252 devices is the batch issue 28 compares at.
TOLERANCE = 0.125


def check(target: int, tolerance: float) -> None:
    """Refuses a batch rule that is not one (ConfigError names the field, the value and the fix)."""
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ConfigError(f"global batch = {target!r} is invalid; give samples per step >= 1")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ConfigError(f"batch tolerance = {tolerance!r} is invalid; give a fraction of the global batch in "
                          "[0, 1), e.g. 0.05 for +-5%")


def batch_for(dp: int, target: int, tolerance: float = TOLERANCE) -> int | None:
    """The global batch a plan of data-parallel degree `dp` trains under the rule: the multiple of
    dp nearest `target` (ties: the smaller; at least dp), None when it is off by more than
    tolerance x target."""
    low = target // dp * dp
    b = low if low and target - low <= low + dp - target else low + dp
    return b if abs(b - target) <= tolerance * target + 1e-9 else None


def batches(devices: int, target: int, tolerance: float = TOLERANCE) -> dict:
    """{global batch: the data-parallel degrees that train it} over every dp a count of `devices`
    can have (its divisors)."""
    out = {}
    for dp in (d for d in range(1, devices + 1) if devices % d == 0):
        b = batch_for(dp, target, tolerance)
        if b is not None:
            out.setdefault(b, set()).add(dp)
    return out


@dataclass(frozen=True)
class Best:
    """A count's best plan under the rule (None: no plan fits in memory)."""

    result: planner.PlanResult | None
    host_s: float  # real seconds the searches took
    others: tuple = ()  # the best plan of each other expert-parallel degree (uncertainty.py's alternatives)

    @property
    def global_batch(self) -> int | None:
        """Samples per step the best plan trains."""
        r = self.result
        return r.plan.dp * r.plan.n_microbatches * r.micro_batch if r else None


def best(system: System, workload: str, target: int, tolerance: float = TOLERANCE, dtype: str = "bf16",
         routing: str | None = None) -> Best:
    """The plan of `system` with the most emulated tokens per second among every plan the rule
    allows (each dp at its own batch), MoE layers routed by `routing` (skew.py; None: balanced)."""
    check(target, tolerance)
    start, found, chip = time.perf_counter(), [], system.chip.name
    for b, dps in sorted(batches(system.devices, target, tolerance).items()):
        for p in planner.plans(system, workload, b):
            fp = fitting(workload, p, b, chip, dtype=dtype) if p.dp in dps else None
            if fp is not None:
                found.append(skew.cost(system, workload, p, b, routing, fp, dtype=dtype))
    ranked = sorted(found, key=lambda r: (-r.tokens_per_s, r.plan.dp))
    others = {}
    for r in ranked[1:]:
        if r.plan.ep != ranked[0].plan.ep:
            others.setdefault(r.plan.ep, r)
    return Best(ranked[0] if ranked else None, time.perf_counter() - start, tuple(others.values()))
