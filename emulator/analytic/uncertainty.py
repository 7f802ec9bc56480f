"""The break-even as a distribution over the uncertain inputs (issue 28 item 6), not a point.

Each sample draws every uncertain input (GEMM and HBM efficiency of each chip, each side's link
efficiency, MoE routing skew, each chip's interruption rate) from its range, and finds the
smallest searched slow count whose best plan matches the fast system's, on throughput and on
goodput (goodput.py). A sample must be cheap, so no plan is searched again: every best plan
that the break-even search already found (the scan from its GEMM-rate lower bound to the answer, the
plot's curve) becomes a `PointModel`, its catalog step split into parts that scale analytically:

    step = (compute + skew compute) x k + (communication + skew all-to-all) / link + pipeline x k
    k    = a / gemm + b / hbm + (1 - a - b)

gemm, hbm and link are factors on the catalog figures; a and b, the shares of the compute that
follow GEMM and HBM efficiency, are measured once per plan by costing it on a variant chip at
0.8 x each efficiency (fullscale.vary: the blocks measured anew on fake tensors), so k is exact
where each kernel is bound by one of them and a linearisation where a kernel sits at the ridge;
the skew terms are skew.cost's extra at a few Zipf exponents, interpolated linearly. Each count
keeps its best plan at catalog figures and its best plan of every other expert-parallel degree
(with the best plan's shares: a skewed router can make a lower ep win); another plan might still
win under other inputs, so a sample's break-even is an upper bound. The answer of a sample is a
searched count: dense from the scan's lower bound to STEP past the catalog answer, every STEP
devices from there up to ABOVE x the answer (searched here), and the plot's curve beyond.
"""

from __future__ import annotations

import bisect
import math
import random
import time
from dataclasses import dataclass

from relay.analytic import fullscale, goodput, skew

SKEWS = (0.1, 0.2, 0.3)  # Zipf exponents at which each MoE plan's skew terms are costed
PROBE = 0.8  # factor on an efficiency for the elasticity measurement
STEP, ABOVE = 16, 1.5  # counts searched above the answer: every one up to STEP past it, then every STEP to ABOVE x it


@dataclass(frozen=True)
class Input:
    """An uncertain input: its range (sampled uniformly, or log-uniformly) and why it is uncertain."""

    name: str  # slow_gemm, slow_hbm, slow_link, fast_gemm, fast_hbm, fast_link, skew, slow_rate, fast_rate
    what: str  # in words, with the absolute figures
    low: float  # a factor on the catalog figure (gemm, hbm, link), a Zipf exponent (skew), per device-hour (rate)
    central: float  # the value the point answer and the tornado's other inputs use
    high: float
    why: str
    log: bool = False  # sample log-uniformly (rates)

    def __post_init__(self):
        if not self.low <= self.central <= self.high:
            raise ValueError(f"input {self.name}: low {self.low} <= central {self.central} <= high {self.high} "
                             "is violated; give an ordered range")

    def draw(self, rng: random.Random) -> float:
        if self.low == self.high:
            return self.low
        if self.log and self.low > 0:
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)


@dataclass(frozen=True)
class PointModel:
    """One system's best plan at the catalog figures, its step as a function of the inputs."""

    devices: int
    tokens_per_step: float
    compute: float  # emulated s per step at catalog figures (compute, optimizer, its kernels)
    comm: float  # emulated s: exposed tensor parallel, expert all-to-all and data parallel
    pipeline: float  # emulated s: bubble and p2p (scaled as compute: the bubble is compute-bound)
    gemm: float = 0.0  # a: share of `compute` that follows GEMM efficiency
    hbm: float = 0.0  # b: share that follows HBM efficiency
    skew: tuple = ()  # ((s, extra compute s, extra all-to-all s), ...) by ascending Zipf exponent s

    def _skew(self, s: float) -> tuple[float, float]:
        grid = ((0.0, 0.0, 0.0),) + tuple(self.skew)
        if s <= 0 or len(grid) == 1:
            return 0.0, 0.0
        i = min(bisect.bisect_left([g[0] for g in grid], s), len(grid) - 1)
        (s0, c0, e0), (s1, c1, e1) = grid[i - 1], grid[i]
        w = (s - s0) / (s1 - s0) if s1 > s0 else 1.0  # beyond the grid: its last slope, extended
        return c0 + w * (c1 - c0), e0 + w * (e1 - e0)

    def step_s(self, gemm: float = 1.0, hbm: float = 1.0, link: float = 1.0, s: float = 0.0) -> float:
        k = self.gemm / gemm + self.hbm / hbm + (1 - self.gemm - self.hbm)
        sc, se = self._skew(s)
        return (self.compute + sc + self.pipeline) * k + (self.comm + se) / link

    def tokens_per_s(self, gemm: float = 1.0, hbm: float = 1.0, link: float = 1.0, s: float = 0.0) -> float:
        return self.tokens_per_step / self.step_s(gemm, hbm, link, s)


@dataclass(frozen=True)
class Goodput:
    """What goodput.goodput needs besides the devices and the rate."""

    state_bytes: float
    storage_gbps: float = goodput.STORAGE_GBPS
    restart_s: float = goodput.RESTART_S

    def fraction(self, devices: int, rate: float) -> float:
        return goodput.goodput(devices, rate, self.state_bytes, self.storage_gbps, self.restart_s).fraction


def breakeven(fast, slow: list, x: dict, good: Goodput | None = None) -> int | None:
    """The smallest slow count (of `slow`, PointModels sorted by devices, several per count
    allowed) matching `fast` (a PointModel, or a list of one count's: the fastest counts) at
    inputs `x` (name -> value); with `good`, on tokens/s x goodput. None: no count matches."""
    fast = fast if isinstance(fast, (list, tuple)) else [fast]
    target = max(f.tokens_per_s(x["fast_gemm"], x["fast_hbm"], x["fast_link"], x["skew"]) for f in fast)
    if good is not None:
        target *= good.fraction(fast[0].devices, x["fast_rate"])
    for p in slow:
        t = p.tokens_per_s(x["slow_gemm"], x["slow_hbm"], x["slow_link"], x["skew"])
        if good is not None:
            t *= good.fraction(p.devices, x["slow_rate"])
        if t >= target:
            return p.devices
    return None


def _percentile(values: list, q: float):
    """The q-quantile (nearest rank) of values, None (not reached) sorting last."""
    ranked = sorted(values, key=lambda v: math.inf if v is None else v)
    return ranked[min(len(ranked) - 1, max(0, math.ceil(q * len(ranked)) - 1))]


def sample(fast, slow: list, inputs: tuple, n: int = 2000, seed: int = 0,
           good: Goodput | None = None) -> dict:
    """n seeded samples of the break-even (and, with `good`, of the goodput break-even): the
    10th, 50th and 90th percentiles, the share not reached, and the tornado (each input alone at
    its low and high end, the others central). A dict for summary.json."""
    start = time.perf_counter()
    slow = sorted(slow, key=lambda p: p.devices)
    rng = random.Random(seed)
    central = {i.name: i.central for i in inputs}
    kinds = {"throughput": None} | ({"goodput": good} if good else {})
    got = {k: [] for k in kinds}
    for _ in range(n):
        x = {i.name: i.draw(rng) for i in inputs}
        for k, g in kinds.items():
            got[k].append(breakeven(fast, slow, x, g))
    out = {"samples": n, "seed": seed, "searched_counts": sorted({p.devices for p in slow}),
           "inputs": [vars(i) for i in inputs]}
    for k, g in kinds.items():
        v = got[k]
        out[k] = {"point": breakeven(fast, slow, central, g), "p10": _percentile(v, 0.1),
                  "p50": _percentile(v, 0.5), "p90": _percentile(v, 0.9),
                  "not_reached": sum(x is None for x in v) / n,
                  "tornado": sorted(({"name": i.name, "what": i.what, "why": i.why,
                                      "low_value": i.low, "high_value": i.high,
                                      "at_low": breakeven(fast, slow, {**central, i.name: i.low}, g),
                                      "at_high": breakeven(fast, slow, {**central, i.name: i.high}, g)}
                                     for i in inputs), key=lambda r: -_swing(r))}
    out["host_s"] = time.perf_counter() - start
    return out


def _swing(row: dict) -> float:
    lo, hi = (math.inf if row[k] is None else row[k] for k in ("at_low", "at_high"))
    return 1e9 if math.inf in (lo, hi) and lo != hi else abs(hi - lo)


def models(point: fullscale.Point, workload: str, skews=SKEWS, dtype: str = "bf16") -> list:
    """A searched point's PointModels: its best plan's (`model`), and its best plan of each other
    expert-parallel degree with the best plan's shares (a skewed router can make a lower ep win)."""
    first = model(point.system, point.best, workload, skews=skews, dtype=dtype)
    return [first] + [model(point.system, b, workload, (first.gemm, first.hbm), skews, dtype)
                      for b in point.others]


def model(system, b, workload: str, shares=None, skews=SKEWS, dtype: str = "bf16") -> PointModel:
    """A plan's PointModel (b: a planner.PlanResult on `system`): its breakdown, its shares
    (two costings on variant chips, unless given) and, under expert parallelism, its skew terms.
    Each plan is costed at the batch it trains (the batch rule's multiple of its dp)."""
    from relay.analytic import planner

    plan, bd = b.plan, b.breakdown
    global_batch = plan.dp * plan.n_microbatches * b.micro_batch
    if shares is None:
        shares = []
        for param in ("matmul_eff", "mem_eff"):
            r = fullscale.Range(param, param, PROBE, PROBE, "elasticity probe")
            varied = planner.cost(fullscale.vary(system, r, PROBE), workload, plan, global_batch, b.memory,
                                  dtype=dtype)
            grown = (varied.breakdown.compute + varied.breakdown.pipeline) / (bd.compute + bd.pipeline) - 1
            shares.append(max(grown / (1 / PROBE - 1), 0.0))
    gemm, hbm = shares
    if gemm + hbm > 1:  # a kernel at the ridge counted twice: shares scaled to the whole
        gemm, hbm = gemm / (gemm + hbm), hbm / (gemm + hbm)
    grid = []
    if plan.ep > 1:
        for s in skews:
            k = skew.cost(system, workload, plan, global_batch, f"zipf:{s}", b.memory, dtype=dtype).breakdown
            grid.append((s, k.compute + k.pipeline - bd.compute - bd.pipeline,
                         k.expert_all_to_all - bd.expert_all_to_all))
    return PointModel(system.devices, b.tokens_per_s * b.step_s, bd.compute,
                      bd.tensor_parallel + bd.expert_all_to_all + bd.data_parallel, bd.pipeline, gemm, hbm,
                      tuple(grid))


def default_inputs(fast_chip, slow_chip, moe: bool) -> tuple:
    """The uncertain inputs of a fast-versus-slow break-even, their ranges and why (the chips'
    catalog figures are the central values; rates from hardware/reliability.toml)."""
    fr, sr = goodput.rate(fast_chip.name), goodput.rate(slow_chip.name)
    sg, sh, fg, fh = slow_chip.matmul_eff, slow_chip.mem_eff, fast_chip.matmul_eff, fast_chip.mem_eff
    out = [
        Input("slow_gemm", f"{slow_chip.display} GEMM efficiency (0.70-{sg:.3g} of peak; catalog {sg:.3g})",
              0.70 / sg, 1.0, 1.0, "catalog: a 910B2 die's BF16 4096^3 GEMM (315 TFLOPS of 376); the 910C's two "
              "dies and training shapes unmeasured: down to the 0.70 default"),
        Input("slow_hbm", f"{slow_chip.display} HBM efficiency (0.60-0.90 of bandwidth; catalog {sh:.2f})",
              0.60 / sh, 1.0, 0.90 / sh, "no published streaming-kernel figure for any Ascend"),
        Input("slow_link", "UB scale-up collective efficiency (x0.5-x1.2 the catalog's)", 0.5, 1.0, 1.2,
              "no measured UB collective; an Ascend DeepEP-style dispatch/combine reaches 102/152 GB/s "
              "bottleneck bandwidth at EP 8 intranode (sgl-kernel-npu README, read in a copy, github.com/BourneSun0527/"
              "sgl-kernel-npu; the Ascend generation not re-checked), far below 392 GB/s"),
        Input("fast_gemm", f"{fast_chip.display} GEMM efficiency (x0.9-x1 the catalog's {fg:.3f})", 0.9, 1.0, 1.0,
              "catalog: a best-shape GEMM (stas00/ml-engineering); training shapes reach less"),
        Input("fast_hbm", f"{fast_chip.display} HBM efficiency (x0.9-x1.1 the catalog's {fh:.2f})", 0.9, 1.0, 1.1,
              "default figure, not measured on B200"),
        Input("fast_link", "NVLink 5 collective efficiency (x0.8-x1.1 the catalog's)", 0.8, 1.0, 1.1,
              "fabrics.toml's NVLink efficiency; NVL72-wide collectives not measured here"),
        Input("slow_rate", f"{slow_chip.display} interruptions per device-hour ({sr.low:.2g}-{sr.high:.2g})",
              sr.low, sr.per_device_hour, sr.high, sr.source, log=True),
        Input("fast_rate", f"{fast_chip.display} interruptions per device-hour ({fr.low:.2g}-{fr.high:.2g})",
              fr.low, fr.per_device_hour, fr.high, fr.source, log=True),
    ]
    if moe:
        out.append(Input("skew", "MoE routing skew, Zipf exponent 0-0.3 (busiest expert 1x-3.7x the mean "
                         "at DeepSeek-V3's 256 experts)", 0.0, 0.0, 0.3,
                         "routing is balanced by the auxiliary-loss-free bias in DeepSeek-V3; how even per "
                         "batch is not published: an assumed range, hottest experts on one device (worst placement)"))
    else:
        out.append(Input("skew", "MoE routing skew (dense model: none)", 0.0, 0.0, 0.0, "dense model"))
    return tuple(out)


def run(be: fullscale.BreakEven, slow, curve: list, workload: str, max_devices: int, n: int = 2000,
        seed: int = 0) -> dict:
    """The distribution of `be` (a fullscale.BreakEven against the `slow` preset) over
    default_inputs, from its searched points, `curve` (fullscale.Points) and every candidate count
    above the answer as STEP and ABOVE say (searched now)."""
    start = time.perf_counter()
    fast, slow_models, inputs, above = prepare(be, slow, curve, workload, max_devices)
    prep = time.perf_counter() - start
    out = sample(fast, slow_models, inputs, n, seed, Goodput(goodput.state_bytes(goodput.total_params(workload))))
    return {**out, "prepare_s": prep, "searched_above": above}


def prepare(be: fullscale.BreakEven, slow, curve: list, workload: str, max_devices: int) -> tuple:
    """(The fast count's PointModels, every searched slow count's, default_inputs, the counts
    searched above the answer), as `run` samples them."""
    from relay.analytic.footprint import config_of

    above = [fullscale.best(slow.scaled(c), workload, be.global_batch, be.tolerance, be.slow_dtype)
             for c in range(be.devices + 1, min(max_devices, max(int(ABOVE * be.devices), be.devices + STEP)) + 1)
             if c <= be.devices + STEP or c % STEP == 0]
    pts = {p.devices: p for p in (*be.points, *curve, *above) if p.best is not None}
    moe = hasattr(config_of(workload), "n_experts")
    fast = models(be.fast, workload, dtype=be.fast_dtype)
    slow_models = [m for _, p in sorted(pts.items()) for m in models(p, workload, dtype=be.slow_dtype)]
    return fast, slow_models, default_inputs(be.fast.system.chip, slow.chip, moe), [p.devices for p in above]
