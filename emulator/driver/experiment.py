"""Experiments: sweeps and break-even searches over real training runs.

A *point* is one training run (or, past what the machine holds, a prediction) of one workload
on one system with one algorithm; its row holds the run's summary. A sweep is a list of points
run on one set of device actors. Break-even finds the smallest number of slow devices whose
emulated throughput (or time to a target loss) reaches the fast system's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from relay.collectives import simulate
from relay.driver.metrics import figures
from relay.errors import ConfigError
from relay.hardware.system import System
from relay.kernels.cost import ITEMSIZE
from relay.trainer import TrainConfig, bucket_sizes

# summary fields a point row carries (all emulated, except wall_s and fidelity)
ROW_FIELDS = ["step_s", "compute_s", "comm_s", "exposed_comm_s", "other_s", "samples_per_s",
              "tokens_per_s", "mfu", "energy_j", "energy_per_sample_j", "energy_per_token_j",
              "final_loss", "wall_s", "fidelity"]


@dataclass
class Point:
    system: System
    algorithm: str
    row: dict  # summary figures (ROW_FIELDS) plus identification
    result: object = None  # the TrainResult of a real run (None when predicted)
    predicted: bool = False


def point_row(system: System, algorithm: str, config: TrainConfig, summary: dict, predicted: bool) -> dict:
    b = config.batch_for(config.replicas(system.devices))
    return {"system": system.name or "custom", "chip": system.chip.name, "devices": system.devices,
            "domain": system.domain, "algorithm": algorithm, "per_device_batch": b,
            "batch_scale": config.batch_scale, "global_batch": config.global_samples(system.devices),
            "predicted": predicted, "power_basis": system.power_basis, **{k: summary.get(k) for k in ROW_FIELDS}}


def run_point(cluster, system: System, algorithm: str, config: TrainConfig) -> Point:
    """One real training run on the cluster's first system.devices workers."""
    cluster.configure(system)
    if config.parallel is not None:  # a sweep's plan: dp is what tp x pp leave of the point's devices
        config = config.replace(parallel=config.parallel.fill(system.devices))
    res = cluster.train(config.replace(algorithm=algorithm))
    return Point(system, algorithm, point_row(system, algorithm, config, res.summary(), False), res)


def predict_point(measured: Point, system: System, config: TrainConfig) -> Point:
    """A point too large for this machine, from a real run of the same chip: per-device compute
    is that run's (weak scaling: each device's work does not depend on the count), the
    gradient all-reduce of each bucket is simulated with the local executor on the large system,
    and the run's share of communication left exposed by overlap is kept."""
    if config.parallel is not None:
        raise ConfigError(f"a point of {system.devices} devices is past what this host runs, and predicting a "
                          "parallelism plan's point is not done; sweep fewer devices (--max-real-devices)")
    m = measured.row
    dtype = measured.result.config["dtype"] if measured.result is not None else "bf16"
    elem = ITEMSIZE[dtype]
    comm = sum(simulate("all_reduce", measured.algorithm, n * elem, system, dtype="uint8")
               for n in bucket_sizes(config, elem))
    exposed = comm * (m["exposed_comm_s"] / m["comm_s"] if m["comm_s"] else 1.0)
    step = m["compute_s"] + exposed + m["other_s"]
    samples = system.devices * config.batch_for(system.devices) * config.batch_scale
    tps = config.workload.tokens_per_sample
    flops = m["mfu"] * m["step_s"] * measured.system.peak("bf16") / measured.system.devices
    derived = figures(system, samples, tps, dtype, step, m["compute_s"], exposed, flops)
    energy = derived["energy_j"]
    summary = {"step_s": step, "compute_s": m["compute_s"], "comm_s": comm, "exposed_comm_s": exposed,
               **derived, "other_s": m["other_s"],
               "energy_per_sample_j": energy / samples if energy else None,
               "energy_per_token_j": energy / samples / tps if energy and tps else None,
               "final_loss": None, "wall_s": None, "fidelity": None}
    return Point(system, measured.algorithm, point_row(system, measured.algorithm, config, summary, True),
                 None, True)


def throughput(point: Point) -> float:
    """Tokens per emulated second when the workload has tokens, else samples per second."""
    return point.row["tokens_per_s"] or point.row["samples_per_s"]


# ---------------------------------------------------------------- sweeps
def sweep(cluster, systems: list[System], algorithms: list[str], config: TrainConfig, capacity: int,
          progress=None, on_point=None, done: dict | None = None) -> list[Point]:
    """Every system x algorithm. Systems larger than `capacity` devices are predicted from the
    largest real run of the same chip and algorithm. `done` maps (system name, chip, devices,
    algorithm) to rows already run (a resumed sweep skips them)."""
    points, real = [], {}
    order = sorted(systems, key=lambda s: s.devices)
    for system in order:
        for algorithm in algorithms:
            key = (system.name or "custom", system.chip.name, system.devices, algorithm)
            if done and key in done:
                p = Point(system, algorithm, done[key], None, done[key]["predicted"])
            elif system.devices <= capacity:
                p = run_point(cluster, system, algorithm, config)
                real[system.chip.name, algorithm] = p
            else:
                base = real.get((system.chip.name, algorithm))
                if base is None:
                    base = run_point(cluster, system.scaled(capacity), algorithm, config)
                    real[system.chip.name, algorithm] = base
                p = predict_point(base, system, config)
            points.append(p)
            if on_point:
                on_point(p)
            if progress is not None:
                progress.update(1)
    return points


# ---------------------------------------------------------------- break-even
@dataclass
class BreakEven:
    algorithm: str
    fast: Point
    slow: Point | None  # the break-even point (None: not reached within max_devices)
    devices: int | None  # break-even device count
    naive_devices: float  # from the FLOPS ratio alone
    efficiency: float | None  # scaling efficiency of the slow system at break-even
    probes: list[Point] = field(default_factory=list)  # every slow point run or predicted
    metric: str = "throughput"
    target_loss: float | None = None
    below: Point | None = None  # the slow point one device short of the answer (it must fall short)
    non_monotone: list = field(default_factory=list)  # (n, m): n < m devices, yet m did worse than n
    smallest: int = 1  # the smallest count searched (with a plan: the smallest it takes)

    @property
    def verified(self) -> bool | None:
        """The count just below the answer was run and fell short (None: the answer is the
        smallest count, or none was reached)."""
        if self.devices is None or self.devices == self.smallest:
            return None
        return self.below is not None and not _better(_metric(self.below, self.metric, self.target_loss),
                                                      self.fast_value, self.metric)

    def row(self) -> dict:
        f, s = self.fast.row, self.slow.row if self.slow else {}
        per = "energy_per_token_j" if f.get("energy_per_token_j") is not None else "energy_per_sample_j"
        return {"algorithm": self.algorithm, "metric": self.metric,
                "fast": f"{f['devices']} x {f['chip']}", "fast_throughput": self.fast_value,
                "break_even_devices": self.devices, "naive_devices": self.naive_devices,
                "slow_throughput": self.slow_value, "scaling_efficiency": self.efficiency,
                "predicted": bool(self.slow and self.slow.predicted),
                "fast_energy_per_unit_j": f.get(per), "slow_energy_per_unit_j": s.get(per),
                "fast_power_basis": f.get("power_basis"), "slow_power_basis": s.get("power_basis"),
                "below_devices": self.below.system.devices if self.below else None,
                "below_value": _metric(self.below, self.metric, self.target_loss) if self.below else None,
                "verified": self.verified, "non_monotone": [list(pair) for pair in self.non_monotone],
                "energy_unit": "token" if per == "energy_per_token_j" else "sample"}

    @property
    def fast_value(self):
        return _metric(self.fast, self.metric, self.target_loss)

    @property
    def slow_value(self):
        return _metric(self.slow, self.metric, self.target_loss) if self.slow else None


def time_to_loss(point: Point, target: float, window: int = 3) -> float | None:
    """Emulated seconds until the mean of the last `window` losses first reaches `target`."""
    if point.result is None:
        return None
    t, losses = 0.0, []
    for s in point.result.steps:
        t += s["step_s"]
        losses.append(s["loss"])
        if len(losses) >= window and sum(losses[-window:]) / window <= target:
            return t
    return None


def _metric(point: Point, metric: str, target: float | None):
    return throughput(point) if metric == "throughput" else time_to_loss(point, target)


def _better(value, reference, metric: str) -> bool:
    if value is None:
        return False
    return value >= reference if metric == "throughput" else value <= reference


def search(passes, guess: int, lo: int = 1, hi: int = 4096) -> int | None:
    """Smallest n in [lo, hi] with passes(n), assuming passes is monotone (false, then true),
    galloping out from `guess` and then bisecting. None when even hi fails."""
    guess = min(max(guess, lo), hi)
    if passes(guess):
        good, step = guess, 1
        while good - step >= lo and passes(good - step):
            good, step = good - step, step * 2
        bad = max(good - step, lo - 1)
    else:
        bad, step = guess, 1
        while True:
            if bad + step > hi:
                if bad == hi or not passes(hi):
                    return None
                good = hi
                break
            if passes(bad + step):
                good = bad + step
                break
            bad, step = bad + step, step * 2
    while good - bad > 1:
        mid = (good + bad) // 2
        if passes(mid):
            good = mid
        else:
            bad = mid
    return good


def breakeven(cluster, fast: System, slow: System, algorithm: str, config: TrainConfig, capacity: int,
              metric: str = "throughput", target_loss: float | None = None, max_devices: int | None = None,
              on_point=None, known: dict | None = None, guess: int | None = None) -> BreakEven:
    """Smallest slow.scaled(n) whose throughput (or time to `target_loss`) reaches `fast`'s, by a
    search over real runs (predicted past `capacity`). Starts from the one-device ratio, or from
    `guess`. `known` maps systems to points already run with this algorithm and settings (they
    are reused, not run again).

    The search assumes that more devices never do worse, and checks it: the count just below
    the answer is run (the search has usually run it already) and must fall short, and any pair
    of probes where more devices did worse is reported in `non_monotone`.

    With a parallelism plan (config.parallel), both sides run it with dp filled from their
    device count, and only the counts the plan takes are probed (`plan_counts`: multiples of
    tp x pp x ep), none past `capacity` (a plan's point is not predicted); "one device" above
    and "just below" then mean the smallest such count and the next one down."""
    if metric not in ("throughput", "time-to-loss"):
        raise ConfigError(f"metric = {metric!r} is unknown; choose 'throughput' or 'time-to-loss'")
    if metric == "time-to-loss" and target_loss is None:
        raise ConfigError("metric = 'time-to-loss' needs target_loss (e.g. --target-loss 2.5)")
    cache: dict[System, Point] = dict(known or {})

    def measure(system: System) -> Point:
        if system in cache:
            return cache[system]
        if system.devices <= capacity:
            p = run_point(cluster, system, algorithm, config)
        elif metric == "throughput":
            real = [q for q in cache.values() if not q.predicted and q.system.chip == system.chip]
            base = max(real, key=lambda q: q.system.devices, default=None) or \
                run_point(cluster, system.scaled(capacity), algorithm, config)
            p = predict_point(base, system, config)
        else:
            raise ConfigError(f"time-to-loss needs real training; {system.devices} devices do not fit "
                             f"this machine (room for {capacity})")
        if on_point:
            on_point(p)
        cache[system] = p
        return p

    if metric == "time-to-loss" and fast.devices > capacity:
        raise ConfigError(f"the fast system ({fast.devices} devices) does not fit this machine (room for {capacity})")
    unit, first = plan_counts(config, fast.devices, capacity if config.parallel is not None else None)
    f = measure(fast)
    target = _metric(f, metric, target_loss)
    if target is None:
        raise ConfigError(f"the fast system never reached loss {target_loss} in {config.steps} steps; "
                         "raise steps or the target loss")
    naive = fast.devices * fast.chip.peak_flops("bf16") / slow.chip.peak_flops("bf16")
    one_fast = measure(fast.scaled(first)).row["step_s"]
    one_slow = measure(slow.scaled(first))
    guess = guess or math.ceil(fast.devices * one_slow.row["step_s"] / one_fast)
    limit = max_devices or max(4 * math.ceil(naive), 2 * guess)
    if config.parallel is not None:
        limit = min(limit, capacity)
    # the search runs over k: unit x k devices (unit 1 without a plan)
    k = search(lambda k: _better(_metric(measure(slow.scaled(unit * k)), metric, target_loss), target, metric),
               math.ceil(guess / unit), first // unit, max(limit // unit, first // unit))
    n = unit * k if k else None
    below = measure(slow.scaled(n - unit)) if n and n > first else None  # usually run by the search already
    probes = sorted((p for sys_, p in cache.items() if sys_ == slow.scaled(sys_.devices)),
                    key=lambda p: p.system.devices)
    worse = _non_monotone(probes, metric, target_loss)
    if n is None:
        return BreakEven(algorithm, f, None, None, naive, None, probes, metric, target_loss, None, worse, first)
    s = cache[slow.scaled(n)]
    eff = throughput(s) / (n / first * throughput(one_slow))
    return BreakEven(algorithm, f, s, n, naive, eff, probes, metric, target_loss, below, worse, first)


def plan_counts(config: TrainConfig, fast_devices: int, capacity: int | None) -> tuple[int, int]:
    """The device counts a break-even search may probe: multiples of `unit` from `first` (1 and 1
    without a plan; with one, tp x pp x ep, and twice that for fsdp without ep, which needs two
    replicas). Refuses a fast system the plan does not take, or a plan no count up to
    `capacity` takes."""
    p = config.parallel
    if p is None:
        return 1, 1
    unit = p.tp * p.pp * p.ep
    first = 2 * unit if p.fsdp and p.ep == 1 else unit
    if fast_devices % unit or fast_devices < first:
        raise ConfigError(f"breakeven: the fast system's {fast_devices} devices do not take --parallel {p} (it needs "
                          f"a multiple of tp x pp x ep = {unit}, at least {first}); give --fast-devices that do")
    if capacity is not None and fast_devices > capacity:
        raise ConfigError(f"breakeven: the fast system's {fast_devices} devices are more than this host runs "
                          f"({capacity}), and a plan's point is not predicted; give fewer --fast-devices")
    if capacity is not None and first > capacity:
        raise ConfigError(f"breakeven: --parallel {p} needs at least {first} devices and this host runs {capacity}; "
                          "give a plan with smaller tp, pp, ep (or raise --max-real-devices)")
    return unit, first


def _non_monotone(probes: list[Point], metric: str, target: float | None) -> list[tuple[int, int]]:
    """Pairs (n, m), n < m, of probes where m devices did worse than n (lower throughput, or a
    later or no arrival at the target loss): the search's assumption failing."""
    out = []
    for i, p in enumerate(probes):
        for q in probes[i + 1:]:
            v, w = _metric(p, metric, target), _metric(q, metric, target)
            if v is not None and not _better(w, v, metric):
                out.append((p.system.devices, q.system.devices))
    return out
