"""Goodput at scale: the share of wall-clock time a synchronous training job spends on useful
steps when its devices fail, it checkpoints, and it restarts from the last checkpoint.

A job of n devices, each interrupted at `per_device_hour` (emulator/hardware/reliability.toml,
published anchors with ranges), is interrupted at n times that rate: its mean time between
interruptions is M = 1 / (n x rate) (exponential failures, as Young and Daly assume). Every tau
seconds of work it writes a checkpoint of C seconds (the training state, `state_bytes`, over the
storage bandwidth); after an interruption it restarts in R seconds (a fixed restart overhead plus
reading the state back) and redoes the work since the last checkpoint. Daly ("A higher order
estimate of the optimum checkpoint interval for restart dumps", FGCS 22 (2006)) gives the
expected wall time of T seconds of work,

    T_wall = M exp(R / M) (exp((tau + C) / M) - 1) T / tau,

so goodput = T / T_wall = tau / (M exp(R / M) (exp((tau + C) / M) - 1)). The interval that
maximises it: Young's first-order sqrt(2 C M) ("A first order approximation to the optimum
checkpoint interval", CACM 17 (1974)) and Daly's higher-order form (for C < 2M)

    tau = sqrt(2 C M) (1 + sqrt(C / (2M)) / 3 + (C / (2M)) / 9) - C,   else tau = M.

Goodput is reported at Daly's interval (`Goodput.fraction`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import tomllib

from relay.errors import ConfigError

HOUR = 3600.0
# GB/s, aggregate checkpoint storage bandwidth (Llama 3 paper, section 3.3.1: Tectonic, 2 TB/s sustained, 7 peak)
STORAGE_GBPS = 2000.0
RESTART_S = 600.0  # s: noticing the failure, rescheduling, initialising, before reading the state (an estimate)
STATE_BYTES_PER_PARAM = 2 + 12  # bf16 weights + AdamW's fp32 master weights and two moments (trainer.OPTIMIZER_BYTES)
_TABLE = Path(__file__).resolve().parent.parent / "hardware" / "reliability.toml"


@dataclass(frozen=True)
class Rate:
    """A chip's interruptions per device-hour, with the range sampled and its source."""

    per_device_hour: float  # unexpected job interruptions per device per hour, all causes
    low: float
    high: float
    source: str


def rates() -> dict:
    with open(_TABLE, "rb") as fh:
        return {name: Rate(**row) for name, row in tomllib.load(fh).items()}


def rate(chip: str) -> Rate:
    table = rates()
    if chip not in table:
        raise ConfigError(f"goodput: chip = {chip!r} has no interruption rate in {_TABLE.name}; "
                          f"add a sourced row (known: {', '.join(table)})")
    return table[chip]


def young(c_s: float, mtbf_s: float) -> float:
    """Young's optimum checkpoint interval, seconds of work between checkpoints."""
    return math.sqrt(2 * c_s * mtbf_s)


def daly(c_s: float, mtbf_s: float) -> float:
    """Daly's higher-order optimum interval; M itself when C >= 2M."""
    if c_s >= 2 * mtbf_s:
        return mtbf_s
    x = c_s / (2 * mtbf_s)
    return math.sqrt(2 * c_s * mtbf_s) * (1 + math.sqrt(x) / 3 + x / 9) - c_s


def useful_fraction(tau_s: float, c_s: float, r_s: float, mtbf_s: float) -> float:
    """Work / expected wall time with checkpoints every tau_s of work (Daly 2006)."""
    if mtbf_s == math.inf:
        return tau_s / (tau_s + c_s)
    return tau_s / (mtbf_s * math.exp(r_s / mtbf_s) * math.expm1((tau_s + c_s) / mtbf_s))


@dataclass(frozen=True)
class Goodput:
    """One job's interruptions, checkpoints and useful share of the wall clock."""

    devices: int
    per_device_hour: float  # interruptions per device-hour
    mtbf_h: float  # hours between the job's interruptions
    checkpoint_s: float  # seconds to write one checkpoint
    restart_s: float  # seconds from an interruption to running again (overhead + reading the state)
    interval_s: float  # Daly's optimum seconds of work between checkpoints
    young_s: float  # Young's first-order interval, for comparison
    fraction: float  # useful share of wall time at Daly's interval, 0..1


def goodput(devices: int, per_device_hour: float, state_bytes: float, storage_gbps: float = STORAGE_GBPS,
            restart_s: float = RESTART_S) -> Goodput:
    """The goodput of a job of `devices` devices (the module docstring)."""
    for name, v, lo in (("devices", devices, 1), ("per_device_hour", per_device_hour, 0),
                        ("state_bytes", state_bytes, 0), ("storage_gbps", storage_gbps, 1e-12),
                        ("restart_s", restart_s, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= lo:
            raise ConfigError(f"goodput: {name} = {v!r} is invalid; give a number >= {lo:g}")
    c = state_bytes / (storage_gbps * 1e9)
    r = restart_s + c  # the state read back at the same bandwidth
    m = HOUR / (devices * per_device_hour) if per_device_hour > 0 else math.inf
    tau = daly(c, m) if m < math.inf else math.inf
    frac = useful_fraction(tau, c, r, m) if m < math.inf else 1.0
    return Goodput(devices, per_device_hour, m / HOUR, c, r, tau, young(c, m) if m < math.inf else math.inf, frac)


def state_bytes(params: float) -> float:
    """Bytes a checkpoint writes for `params` parameters (weights and AdamW's state)."""
    return params * STATE_BYTES_PER_PARAM


def total_params(workload: str) -> float:
    """Every parameter of `workload` (all experts), counted on the meta device."""
    from relay.analytic.footprint import config_of, parameters  # (the plan search's counts)

    c, p = config_of(workload), parameters(workload, 1, 1).parts
    dense = getattr(c, "n_dense_layers", c.n_layers)
    return p["base"].params + dense * p["dense"].params + (c.n_layers - dense) * (p["moe"].params if "moe" in p else 0)


def breakeven(fast, slow, workload: str, global_batch: int, max_devices: int, fast_rate: float | None = None,
              slow_rate: float | None = None, storage_gbps: float = STORAGE_GBPS, restart_s: float = RESTART_S,
              tolerance: float | None = None, slow_dtype: str = "bf16") -> dict:
    """The break-even on goodput: the smallest slow count whose best plan's tokens/s x goodput
    matches the fast system's (`fast`, a fullscale.Point), each side interrupted at its chip's
    rate (reliability.toml unless given), scanned as fullscale.breakeven scans (from its lower
    bound at the goodput-scaled target; every count has plans under the batch rule, `tolerance`).
    A dict for summary.json."""
    from relay.analytic import batchrule, fullscale  # (imported here: fullscale's sensitivity may use goodput)

    tolerance = batchrule.TOLERANCE if tolerance is None else tolerance

    state = state_bytes(total_params(workload))
    kw = dict(state_bytes=state, storage_gbps=storage_gbps, restart_s=restart_s)
    fr = rate(fast.system.chip.name).per_device_hour if fast_rate is None else fast_rate
    sr = rate(slow.chip.name).per_device_hour if slow_rate is None else slow_rate
    g_fast = goodput(fast.devices, fr, **kw)
    target = fast.tokens_per_s * g_fast.fraction
    # fullscale.lower_bound is linear in the target's tokens/s, and the slow side's goodput is <= 1
    bound = max(math.floor(fullscale.lower_bound(fast, slow, slow_dtype) * g_fast.fraction), 1) if fast.best \
        else max_devices + 1
    answer, g_slow, point = None, None, None
    for n in range(bound, max_devices + 1):
        p = fullscale.best(slow.scaled(n), workload, global_batch, tolerance, slow_dtype)
        g = goodput(n, sr, **kw)
        if p.tokens_per_s * g.fraction >= target:
            answer, g_slow, point = n, g, p
            break
    return {"devices": answer, "state_gb": state / 1e9, "storage_gbps": storage_gbps, "restart_s": restart_s,
            "fast": {**vars(g_fast), "tokens_per_s": fast.tokens_per_s, "goodput_tokens_per_s": target},
            "slow": None if point is None else {**vars(g_slow), "tokens_per_s": point.tokens_per_s,
                                                 "goodput_tokens_per_s": point.tokens_per_s * g_slow.fraction,
                                                 "plan": str(point.best.plan)}}
