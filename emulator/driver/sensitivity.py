"""How far a break-even answer moves with the cost model's uncertain parameters, and what the
full systems would do (predicted from the runs a search made).

Sensitivity: each uncertain parameter is moved to the low and then the high end of a plausible
range, and the break-even search is run again: virtual clock, one algorithm (the one the main
finding names), starting from the main answer, so each case costs a few training runs. The
launch overhead is one figure for every chip, so it moves on both sides (by the same factor);
the efficiencies and the link efficiency move on the slow side only (the less documented chip
and fabric), and the fast system's runs are then reused. The ranges and their reasons are in
RANGES.

Link efficiency is moved by scaling the slow system's scale-up and scale-out bandwidth, on top of
the calibrated fabric's own efficiency (emulator/hardware/fabrics.toml).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from relay.driver.experiment import BreakEven, Point, breakeven, predict_point, throughput
from relay.hardware.system import System
from relay.trainer import TrainConfig


@dataclass(frozen=True)
class Range:
    parameter: str  # launch_us, matmul_eff, mem_eff (chip figures) or link_eff (the fabric)
    low: float
    high: float
    scales: bool  # True: low and high multiply the chip's catalog figure; False: they replace it
    why: str  # where the range comes from
    both: bool = False  # move it on the fast side too (a figure shared by every chip)


RANGES = (
    Range("launch_us", 0.5, 2.0, True,
          "half to twice the catalog figure: per-kernel overhead is ~1-2 us for kernels launched "
          "from a captured graph and 5-10 us for eager launches with their tail", both=True),
    Range("matmul_eff", 0.5, 0.85, False,
          "0.5 for GEMM kernels not tuned to the chip and shapes, 0.85 for the best vendor "
          "libraries on large GEMMs"),
    Range("mem_eff", 0.6, 0.9, False,
          "0.6 for small or strided kernels, 0.9 for the best streaming (STREAM-like) kernels"),
    Range("link_eff", 0.6, 1.25, True,
          "a factor on the calibrated fabric's bandwidth (its efficiency is an estimate where no "
          "collective was measured, as for UB: 0.8, fabrics.toml): x0.6 allows for a less mature "
          "collective stack, x1.25 takes it to line rate"),
)


def vary(system: System, r: Range, value: float) -> System:
    """`system` with one parameter set to `value` (a factor when r.scales)."""
    if r.parameter == "link_eff":
        out = system.scaleout_gbps * value if system.scaleout_gbps is not None else None
        return replace(system, scaleup_gbps=system.scaleup_gbps * value, scaleout_gbps=out)
    figure = getattr(system.chip, r.parameter) * value if r.scales else value
    return replace(system, chip=system.chip.replace(**{r.parameter: figure}))


def sensitivity(cluster, fast: System, slow: System, base: BreakEven, settings: TrainConfig, capacity: int,
                known: dict, max_devices: int | None = None, on_point=None) -> dict:
    """The break-even count at the low and high end of every range in RANGES (a dict for
    summary.json: rows, the base answer, and the host seconds it took). `known` maps the fast
    side's systems to the points the main search ran with base.algorithm."""
    start = time.time()
    rows = []
    for r in RANGES:
        row = {"parameter": r.parameter, "low": r.low, "high": r.high, "scales": r.scales, "why": r.why,
               "side": "both" if r.both else "slow",
               "catalog": None if r.parameter == "link_eff" else getattr(slow.chip, r.parameter)}
        for end in ("low", "high"):
            value = getattr(r, end)
            res = breakeven(cluster, vary(fast, r, value) if r.both else fast, vary(slow, r, value),
                            base.algorithm, settings, capacity, base.metric, base.target_loss, max_devices,
                            on_point=on_point, known=None if r.both else known, guess=base.devices)
            row[f"{end}_devices"] = res.devices
            row[f"{end}_predicted"] = bool(res.slow and res.slow.predicted)
            row[f"{end}_verified"] = res.verified
        rows.append(row)
    return {"algorithm": base.algorithm, "base_devices": base.devices, "rows": rows, "host_s": time.time() - start}


def full_scale(fast: System, slow: System, real: list[Point], settings: TrainConfig) -> dict:
    """Both full systems, predicted from the largest real run of each chip (per-device compute as
    run, each gradient bucket's all-reduce simulated on the full system, the run's exposed share
    of communication kept): predict_point, the machinery Relay uses past the host's size."""
    out = {}
    for side, system in (("fast", fast), ("slow", slow)):
        runs = [p for p in real if not p.predicted and p.system.chip == system.chip]
        if not runs:
            return {}
        base = max(runs, key=lambda p: p.system.devices)
        p = predict_point(base, system, settings)
        unit = "energy_per_token_j" if p.row.get("tokens_per_s") else "energy_per_sample_j"
        out[side] = {"system": system.name or system.chip.name, "devices": system.devices,
                     "from_devices": base.system.devices, "algorithm": p.algorithm,
                     "throughput": throughput(p), "step_s": p.row["step_s"],
                     "exposed_comm_s": p.row["exposed_comm_s"], "comm_s": p.row["comm_s"],
                     "energy_per_unit_j": p.row[unit], "power_basis": system.power_basis}
    return out
