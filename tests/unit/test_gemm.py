"""GEMM efficiency: the chip's best shape, lowered by tile and wave quantisation."""

import pytest

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
