"""How much of a chip's dense peak one GEMM reaches: the chip's best-shape efficiency, lowered
for shapes that leave the machine partly idle.

    efficiency(chip, m, n, k) = chip.matmul_eff x waves(m, n) x edges(m, n)

A GEMM kernel cuts the (m, n) output into tiles, each computed by one SM (CU, AI core) at a
time; the library picks the tile among a few sizes (Relay: the one that wastes least). Two
things waste peak (the tile and wave quantisation NVIDIA's GEMM performance guide describes):
  - edges: a tile that overhangs the matrix computes padding (m = 129 in 128-row tiles costs
    two tile rows);
  - waves: tiles run in waves of `compute_units`; a last, partial wave leaves SMs idle
    (132 SMs and 133 large tiles take two waves, at half occupancy overall).
`chip.matmul_eff` is set so that the best shape of the published "maximum achievable matmul
FLOPS" sweep (stas00/ml-engineering compute/accelerator/README.md) gets its measured TFLOPS
after both factors (see the chip catalog). Chips without a known unit count get edges only.
When the output has fewer tiles than units, libraries split the reduction (cuBLAS split-K,
CUTLASS stream-K): given K, Relay splits it into at most units / tiles slices of at least
K_SLICE, so a small output with a long reduction (a weight gradient over a large batch) still
fills the machine. Small tiles are taken as efficient as large ones, which errs high.
"""

from __future__ import annotations

import functools
import math

# Output tiles cuBLAS / CUTLASS choose among for bf16 (NVIDIA's GEMM performance guide lists
# 256x128, 128x128, 128x64 and 64x64 thread-block tiles); hipBLASLt's macro tiles on CDNA3 are alike.
TILES = ((128, 256), (128, 128), (64, 128), (64, 64))
K_SLICE = 256  # the shortest reduction slice a split-K tile is given


def _one(m: int, n: int, units: int | None, batch: int, tm: int, tn: int, k: int | None = None) -> float:
    rows, cols = math.ceil(m / tm), math.ceil(n / tn)
    edges = (m * n) / (rows * tm * cols * tn)
    if not units:
        return edges
    tiles = rows * cols * batch
    if k and tiles < units:  # split-K: slices of the reduction fill the idle units
        tiles *= max(1, min(units // tiles, k // K_SLICE))
    return edges * tiles / (math.ceil(tiles / units) * units)


@functools.lru_cache(maxsize=4096)  # shapes repeat from step to step; the throttle asks per GEMM
def quantisation(m: int, n: int, units: int | None, batch: int = 1, k: int | None = None) -> float:
    """Share of the tiles' issued work that is useful, in (0, 1], for `batch` GEMMs of (m, n)
    outputs over a reduction of k (None: unknown, no split-K) run as one kernel (bmm), with the
    tile that wastes least. Smaller tiles are taken as efficient as large ones, so this is an
    upper bound on what quantisation leaves."""
    if m <= 0 or n <= 0 or batch <= 0:
        return 1.0
    return max(_one(m, n, units, batch, tm, tn, k) for tm, tn in TILES)


def efficiency(chip, m: int, n: int, k: int, best: float | None = None) -> float:
    """Fraction of dense peak a (m, k) @ (k, n) GEMM reaches on `chip`; `best` overrides the
    chip's best-shape efficiency (a run's --matmul-eff). Before the cost model's cap at the chip's
    fastest measured GEMM (CostModel._capped), which only long, well quantised GEMMs reach."""
    return (chip.matmul_eff if best is None else best) * quantisation(m, n, chip.compute_units, k=k)
