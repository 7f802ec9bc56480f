"""Charging recorded segments (kernels/replay.py) must charge exactly what per-op charging does:
the same lane time at every sync point, the same sums, on real models; and fall back to per-op
charging when a step's inputs change shape or its ops follow the data."""

import pytest
import torch

from relay.hardware.chips import get as chip
from relay.kernels.clock import VirtualLane
from relay.kernels.cost import CostModel
from relay.kernels.replay import Replay, ReplayError, signature
from relay.kernels.throttle import ParameterTensors, Throttle
from relay.trainer import Optimizer, grad_params
from relay.workloads import get


def _train(workload, batches, enabled: bool, batch_scale: int = 1):
    """The device trainer's step structure on one process: forward and backward under the
    throttle (a sync point at each gradient that becomes ready), a sync point after backward,
    the optimizer step, the end of the step. Returns, per step, how it was charged and the
    compute lane's time at every sync point, plus the throttle's sums."""
    torch.manual_seed(0)
    model = workload.build_model()
    opt = Optimizer(workload.optimizer, model.parameters(), workload.lr)
    lane = VirtualLane()
    throttle = Throttle(CostModel(chip("h100")), lane)
    throttle.fixed = ParameterTensors(model.parameters())
    replay = Replay(throttle, enabled=enabled)
    times = []
    position = {p: k for k, p in enumerate(grad_params(model))}

    def ready(p):
        replay.sync(position[p])
        times[-1].append((position[p], lane.scheduled()))

    hooks = [p.register_post_accumulate_grad_hook(ready) for p in position]
    out = []
    for batch in batches:
        times.append([])
        replay.begin((signature(batch), batch_scale))
        throttle.batch_scale = batch_scale
        with replay.charged():
            workload.loss(model, batch).backward()
        throttle.batch_scale = 1.0
        replay.sync("backward")
        times[-1].append(("backward", lane.now()))
        lane.advance_to(lane.now() + 1e-6)  # waiting for the last bucket
        with replay.charged():
            opt.step()
            opt.zero_grad()
        replay.end()
        out.append((replay.mode, times[-1], throttle.emulated_s, throttle.flops, throttle.bytes, throttle.ops,
                    lane.charged_s))
    for h in hooks:
        h.remove()
    return out, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _batches(workload, sizes):
    return [next(workload.batches(0, 1, n, seed)) for seed, n in enumerate(sizes)]


@pytest.mark.parametrize("name, batch_scale", [("gpt-tiny", 1), ("mlp", 1), ("gpt-tiny", 3)])
def test_replayed_steps_charge_exactly_what_per_op_charging_charges(name, batch_scale):
    wl = get(name)
    batches = _batches(wl, [4] * 5)
    per_op, w_per_op = _train(wl, batches, enabled=False, batch_scale=batch_scale)
    fast, w_fast = _train(wl, batches, enabled=True, batch_scale=batch_scale)
    assert [s[0] for s in per_op] == ["per-op"] * 5
    assert [s[0] for s in fast] == ["record", "record", "replay", "replay", "replay"]
    # every sync point (each gradient ready, end of backward) at the same emulated time, to the bit
    assert [s[1:] for s in fast] == [s[1:] for s in per_op]
    assert len(fast[-1][1]) == len(grad_params(wl.build_model())) + 1
    for k in w_per_op:  # the model trained the same
        assert torch.equal(w_fast[k], w_per_op[k])


def test_a_change_of_shape_is_charged_per_op_and_recorded_afresh():
    wl = get("gpt-tiny")
    batches = _batches(wl, [4, 4, 4, 2, 2, 2, 4, 2])
    per_op, _ = _train(wl, batches, enabled=False)
    fast, _ = _train(wl, batches, enabled=True)
    assert [s[0] for s in fast] == ["record", "record", "replay", "record", "record", "replay", "replay", "replay"]
    assert [s[1:] for s in fast] == [s[1:] for s in per_op]
    assert fast[3][1] != fast[2][1]  # the smaller batch really costs something else


class _Steered(torch.nn.Module):
    """A model whose ops follow the data: it runs its second layer only on positive samples."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)

    def forward(self, x):
        h = self.a(x)
        keep = h[:, 0] > 0
        return self.b(h[keep]).sum() + h.sum() * 0  # nonzero inside: an output shape set by the data


def test_a_step_whose_ops_follow_the_data_is_never_replayed():
    torch.manual_seed(0)
    model, lane = _Steered(), VirtualLane()
    throttle = Throttle(CostModel(chip("h100")), lane)
    replay = Replay(throttle)
    for seed in range(4):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(seed))
        replay.begin(signature(x))
        with replay.charged():
            model(x).backward()
        replay.end()
    assert replay.modes == ["record", "per-op", "per-op", "per-op"]
    assert throttle.ops > 0


def test_moe_routing_turns_replay_off():
    """moe-debug routes its tokens by their real top-k: the experts' batch shapes follow the data."""
    wl = get("moe-debug")
    batches = _batches(wl, [2] * 3)
    per_op, _ = _train(wl, batches, enabled=False)
    fast, _ = _train(wl, batches, enabled=True)
    assert [s[0] for s in fast] == ["record", "per-op", "per-op"]
    assert [s[1:] for s in fast] == [s[1:] for s in per_op]


def test_a_replayed_step_with_other_sync_points_raises():
    wl = get("mlp")
    torch.manual_seed(0)
    model = wl.build_model()
    throttle = Throttle(CostModel(chip("h100")), VirtualLane())
    replay = Replay(throttle)
    batch = next(wl.batches(0, 1, 4, 0))
    for tag in ("backward", "backward"):
        replay.begin(signature(batch))
        with replay.charged():
            wl.loss(model, batch).backward()
        replay.sync(tag)
        replay.end()
        model.zero_grad()
    replay.begin(signature(batch))
    assert replay.mode == "replay"
    with replay.charged():
        wl.loss(model, batch).backward()
    with pytest.raises(ReplayError, match="replay=False"):
        replay.sync("another sync point")  # Python state changed the step
    assert not replay.enabled  # and every later step is charged per op
