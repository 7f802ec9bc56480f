"""GEMM efficiency: the chip's best shape, lowered by tile and wave quantisation."""

import pytest
import torch

from relay import chips
from relay.kernels.cost import CostModel
from relay.kernels.gemm import _one, efficiency, quantisation


def test_full_waves_of_whole_tiles_waste_nothing():
    assert quantisation(128 * 132, 256, 132) == 1.0  # 132 tiles on 132 SMs
    assert quantisation(256, 256, None) == 1.0


def test_one_tile_too_many_costs_a_wave():
    """133 large tiles on 132 SMs take two waves, the second nearly empty; the library would
    rather take 64 x 64 tiles: 1064 of them in 9 waves of 132."""
    assert _one(128 * 133, 256, 132, 1, 128, 256) == pytest.approx(133 / 264)
    assert quantisation(128 * 133, 256, 132) == pytest.approx(1064 / 1188)


def test_tile_edges_waste_padding():
    assert quantisation(129, 256, None) == pytest.approx(129 / 192)  # 64-row tiles: 3 of them
    assert quantisation(1, 1, None) == 1 / (64 * 64)


def test_efficiency_falls_for_small_and_skinny_shapes_and_not_for_the_best():
    h100 = chips.get("h100")
    best = efficiency(h100, 2048, 2048, 13312)
    assert best == pytest.approx(h100.matmul_eff * quantisation(2048, 2048, 132))
    assert efficiency(h100, 4096, 4096, 4096) > 0.95 * h100.matmul_eff
    assert efficiency(h100, 16, 4096, 4096) < 0.3 * h100.matmul_eff  # skinny: few tiles, one wave
    model = CostModel(chips.get("h100"))
    small, big = model.matmul_cost(512, 512, 512), model.matmul_cost(8192, 8192, 8192)
    assert small.flops / (small.seconds - model.launch_us * 1e-6) < big.flops / (big.seconds - model.launch_us * 1e-6)


def test_published_chips_carry_their_measured_efficiency():
    for name in ("a100", "h100", "b200", "b200-hgx", "mi300x"):
        c = chips.get(name)
        assert c.matmul_eff != chips.MATMUL_EFF and "matmul_eff" in c.sources and c.compute_units


def test_a_small_output_over_a_long_reduction_is_split_to_fill_the_units():
    # a 64 x 64 weight gradient over 524288 rows (batch_scale): one tile, but split-K slices
    # of the reduction fill all 148 SMs; without K it would run on one SM
    assert quantisation(64, 64, 148) == pytest.approx(1 / 148)
    assert quantisation(64, 64, 148, k=524288) == 1.0
    assert quantisation(64, 64, 148, k=512) == pytest.approx(2 / 148)  # two slices of 256
    assert quantisation(128 * 132, 256, 132, k=8192) == 1.0  # enough tiles: no split


def test_no_gemm_is_charged_faster_than_the_fastest_gemm_measured():
    """matmul_eff is set from the MAMF sweep's best shape after that shape's quantisation and
    launch, so a long GEMM that quantises perfectly would run faster than any GEMM the sweep
    measured (on an H100 843 TFLOPS, of 794.5): it is charged the MAMF, launch included; the best
    shape itself, and shapes slower than the MAMF, are charged as before; FP8 at the FP8 MAMF."""
    h100 = chips.get("h100")
    model = CostModel(h100)
    m, k, n = 128 * 132, 8192, 4096  # 132 tiles of 128 x 256 per column of tiles: full waves
    assert quantisation(m, n, 132, k=k) == 1.0
    flops = 2 * m * k * n
    uncapped = model.launch_us * 1e-6 + flops / (h100.peak_flops() * h100.matmul_eff)
    assert flops / uncapped > 840e12  # what the efficiency alone would give
    assert model.matmul_cost(m, k, n).seconds == pytest.approx(flops / 794.5e12, rel=1e-12)
    assert model.matmul_cost(m, k, n, fp8=True).seconds == pytest.approx(flops / 1402.6e12, rel=1e-12)
    best = model.matmul_cost(2048, 13312, 2048)  # the sweep's best shape: as its efficiency was set from it
    assert best.seconds == pytest.approx(model.launch_us * 1e-6 + best.flops / (  # (to matmul_eff's 4 digits)
        h100.peak_flops() * h100.matmul_eff * quantisation(2048, 2048, 132, k=13312)), rel=1e-4)
    assert best.flops / best.seconds == pytest.approx(794.5e12, rel=1e-9)
    small = model.matmul_cost(512, 512, 512)  # far below the MAMF: untouched
    assert small.seconds == pytest.approx(model.launch_us * 1e-6 + max(
        small.flops / (h100.peak_flops() * h100.matmul_eff * quantisation(512, 512, 132, k=512)),
        small.bytes / (h100.hbm_Bps * h100.mem_eff)), rel=1e-12)
    # a run's efficiency override scales the cap with it; a chip without a sweep is not capped
    half = CostModel(h100, matmul_eff=h100.matmul_eff / 2).matmul_cost(m, k, n)
    assert half.seconds == pytest.approx(2 * flops / 794.5e12, rel=1e-12)
    tpu = chips.get("tpu-v5e")
    assert tpu.gemm_cap() == 1.0 and tpu.mamf_tflops is None
    assert h100.gemm_cap() == pytest.approx(794.5 / (989.4 * h100.matmul_eff))


def _rate(model, func, args, out, scale) -> float:
    """FLOP/s of one GEMM as the throttle charges it at `scale` times the batch (its bytes aside)."""
    flops, _, _, q = model.op_parts(func, args, None, out, None if scale == 1 else (lambda t: False), scale)
    return flops * scale / model.seconds(flops * scale / q, 0)


@pytest.mark.parametrize("scale", [1, 132])
def test_every_gemm_is_capped_at_its_precisions_fastest_gemm_at_any_batch_scale(scale):
    """The "fp8" recipe's Linear GEMM, the experts' grouped GEMMs (forward, input and weight
    gradients), serving's FP8 grouped GEMM (weights in FP8), each long and well quantised, at the
    throttle's batch scale too: no faster than the chip's MAMF at the precision it runs in; a
    chip.replace that lowers the efficiency lowers the cap with it."""
    from relay.analytic.serving import ServingCost
    from relay.kernels import moe_ops

    h100 = chips.get("h100")
    meta = lambda *s: torch.empty(*s, device="meta", dtype=torch.bfloat16)  # noqa: E731
    m, k, n, g = 16384, 4096, 4224, 4  # rows of all groups, in and out features, groups
    x, w, counts = meta(m, k), [meta(n, k) for _ in range(g)], [m // g] * g
    ops = [(torch.ops.aten.mm.default, (meta(m, k), meta(k, n)), meta(m, n), "fp8", 1402.6),
           (torch.ops.aten.mm.default, (meta(m, k), meta(k, n)), meta(m, n), "bf16", 794.5),
           (torch.ops.relay.grouped_mm.default, (x, w, counts), meta(m, n), "bf16", 794.5),
           (torch.ops.relay.grouped_mm_dx.default, (meta(m, n), w, counts), meta(m, k), "bf16", 794.5),
           (torch.ops.relay.grouped_mm_dw.default, (meta(m, n), x, counts), [meta(n, k)] * g, "bf16", 794.5)]
    for func, args, out, dtype, mamf in ops:
        assert _rate(CostModel(h100, dtype), func, args, out, scale) == pytest.approx(mamf * 1e12, rel=1e-9), func
    serving = ServingCost(h100, "fp8")
    assert _rate(serving, torch.ops.relay.grouped_mm.default, (x, w, counts), meta(m, n), scale) == \
        pytest.approx(1402.6e12, rel=1e-9)
    assert moe_ops.GROUPED_GEMMS_FORWARD is torch.ops.relay.grouped_mm
    slower = CostModel(h100.replace(matmul_eff=0.9 * h100.matmul_eff))
    assert _rate(slower, *ops[1][:3], scale) == pytest.approx(0.9 * 794.5e12, rel=1e-9)
    assert h100.replace(matmul_eff=0.5).gemm_cap() == pytest.approx(h100.gemm_cap())
