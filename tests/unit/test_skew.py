"""Routing skew in the plan search (emulator/analytic/skew.py): the busiest expert-parallel
device sets the step. Pure: no Ray (the fake-run check is tests/ray/test_plan_search.py)."""

import json

import pytest

from relay import Parallel, System
from relay.analytic import planner, skew
from relay.analytic.footprint import config_of
from relay.errors import ConfigError
from relay.workloads import routing

SYSTEM, BATCH = System("h100", 4), 256


def test_hot_factor_by_hand(tmp_path):
    # moe-debug: 8 experts, top 2; at ep = 4 device r holds experts 2r, 2r + 1. Weights
    # [4, 0, 1, 1, 1, 1, 0, 0] over 16 choices give counts [8, 0, 2, 2, 2, 2, 0, 0]: device 0
    # gets 8 of each peer's 16 choices, ep x 8 / 16 = 2 times the balanced share
    path = tmp_path / "counts.json"
    path.write_text(json.dumps([4, 0, 1, 1, 1, 1, 0, 0]))
    c = config_of("moe-debug")
    assert skew.hot_factors(skew.parse(str(path)), c, 4, 16) == [2.0, 2.0]
    assert skew.hot_factors(routing.balanced(), c, 4, 16) == [1.0, 1.0]
    assert skew.parse("balanced") is None and skew.parse(None) is None


def test_skew_slows_expert_parallel_plans_only():
    ep = Parallel(dp=4, ep=4)
    flat = planner.cost(SYSTEM, "moe-debug", ep, BATCH)
    assert skew.cost(SYSTEM, "moe-debug", ep, BATCH, "balanced") == flat
    mild, strong = (skew.cost(SYSTEM, "moe-debug", ep, BATCH, f"zipf:{s}") for s in (0.5, 1.5))
    assert flat.step_s < mild.step_s < strong.step_s
    assert strong.breakdown.expert_all_to_all > flat.breakdown.expert_all_to_all
    assert strong.breakdown.compute > flat.breakdown.compute
    assert strong.tokens_per_s == pytest.approx(flat.tokens_per_s * flat.step_s / strong.step_s)
    # without expert parallelism every device holds every expert: its rows do not change
    dp = Parallel(dp=4)
    assert skew.cost(SYSTEM, "moe-debug", dp, BATCH, "zipf:1.5") == planner.cost(SYSTEM, "moe-debug", dp, BATCH)


def test_bad_routing_is_refused_naming_it():
    with pytest.raises(ConfigError, match="zipf:x"):
        skew.cost(SYSTEM, "moe-debug", Parallel(dp=4, ep=4), BATCH, "zipf:x")
