import random
import time

import pytest
import torch

from relay import chips
from relay.kernels.calibrate import check_dilation, dilation_for
from relay.kernels.clock import VirtualLane, WallLane
from relay.kernels.cost import CostModel
from relay.kernels.throttle import Throttle, throttled_matmul


def _train_steps(lane):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Throttle(CostModel(chips.get("h100")), lane) as t:
        for _ in range(3):
            loss = model(torch.randn(16, 32)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    return lane.t, t.ops, t.flops


def test_virtual_clock_is_deterministic_to_the_bit():
    a, b = _train_steps(VirtualLane()), _train_steps(VirtualLane())
    assert a == b and a[0] > 0 and a[2] > 0


def test_throttled_matmul_charges_its_modeled_cost():
    lane = VirtualLane()
    out = throttled_matmul(torch.ones(64, 32), torch.ones(32, 16), chip=chips.get("h100"), lane=lane)
    assert torch.equal(out, torch.full((64, 16), 32.0))
    assert lane.t == CostModel(chips.get("h100")).matmul_cost(64, 32, 16).seconds


def test_paused_throttle_charges_nothing():
    lane = VirtualLane()
    with Throttle(CostModel(chips.get("h100")), lane) as t:
        with t.pause():
            torch.randn(100) + 1
    assert lane.t == 0 and t.ops == 0


def test_wall_lane_never_runs_ahead_of_its_schedule():
    lane = WallLane(dilation=1000.0)  # 1 emulated ms = 1 real s
    start = time.time()
    lane.charge(5e-6)  # 5 ms real: more than the coalescing quantum, so it sleeps now
    lane.advance_to(12e-6)  # a sync point: sleeps exactly up to 12 ms real
    assert time.time() - start >= 0.012
    assert lane.overruns == 0


def test_wall_lane_counts_an_overrun_when_the_host_is_too_slow():
    lane = WallLane(dilation=1.0)
    time.sleep(0.05)  # real work of 50 ms ...
    lane.charge(1e-6)  # ... charged as 1 us at dilation 1: the lane is behind
    stats = lane.stats()
    assert lane.overruns == 1 and stats["overrun_s"] >= 0.04 and stats["fidelity"] < 0.5


def test_auto_dilation_fits_70_percent_of_the_cores():
    assert dilation_for(100.0, devices=1, cores=2) == pytest.approx(100 / 0.7)
    assert dilation_for(100.0, devices=8, cores=2) == pytest.approx(100 * 4 / 0.7)


def test_too_small_dilation_names_the_one_that_fits():
    with pytest.raises(ValueError, match=r"dilation = 10 is too small .* need dilation >= 285.7"):
        check_dilation(10, dilation_for(100.0, 4, 2), 4, 2)


def test_charging_a_recorded_run_of_costs_rounds_as_charging_them_one_by_one():
    rng = random.Random(1)
    costs = [rng.random() * 10 ** rng.randint(-9, -3) for _ in range(50)]  # op costs, s
    one, all_ = VirtualLane(), VirtualLane()
    one.charge(0.3)
    all_.charge(0.3)
    for c in costs:
        one.charge(c)
    all_.charge_all(costs)
    assert (all_.now(), all_.charged_s) == (one.now(), one.charged_s)
    assert one.now() != 0.3 + sum(costs)  # adding the run's sum at once would round otherwise


def test_a_wall_lane_paces_a_recorded_run_once_at_its_end():
    lane = WallLane(dilation=1.0)
    start = time.time()
    lane.charge_all([0.01] * 5)  # the work is done: the lane sleeps off its lead once
    assert lane.scheduled() == pytest.approx(0.05)
    assert time.time() - start >= 0.05 - lane.quantum_s / 2 - 1e-3
    assert lane.overruns == 0
