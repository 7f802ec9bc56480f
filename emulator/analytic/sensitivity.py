"""The uncertain parameters of the cost model and their plausible ranges (RANGES), and a system
with one of them moved (`vary`): what the sensitivity of a measured break-even moves
(driver/sensitivity.py runs the searches). The launch overhead is one figure for every chip, so it
moves on both sides (by the same factor); the efficiencies and the link efficiency move on the slow
side only (the less documented chip and fabric).

Link efficiency is moved by scaling the slow system's scale-up and scale-out bandwidth, on top of
the calibrated fabric's own efficiency (emulator/hardware/fabrics.toml).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from relay.hardware.system import System


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
