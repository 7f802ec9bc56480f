"""Fake-tensor execution of one device's training step (emulator/device/fake/measure.py), fake mode's
answers remembered (emulator/device/fake/ops.py) and the MoE routing models
(emulator/workloads/routing.py). No Ray."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from relay.device.fake.measure import by_layers, step_cost
from relay.device.fake.ops import FreshOps
from relay.hardware.chips import get as get_chip
from relay.workloads.routing import Histogram, Zipf, apportion, balanced

H100 = get_chip("h100")


@pytest.mark.parametrize("name", ["llama-debug", "moe-debug"])
def test_a_fake_step_costs_exactly_what_the_real_step_costs(name):
    """Same ops, same shapes, same costs, to the bit: the cost model reads shapes only. The MoE
    routes the fake tokens as the real run did (a histogram of its real top-k counts)."""
    real = step_cost(name, 4, H100, tensors="real")
    fake = step_cost(name, 4, H100, tensors="fake", routing=Histogram(real.routing) if real.routing else None)
    assert (fake.seconds, fake.flops, fake.bytes, fake.ops) == (real.seconds, real.flops, real.bytes, real.ops)
    assert fake.forward_backward_s == real.forward_backward_s < real.seconds  # the optimizer step costs too
    assert fake.routing == real.routing
    assert real.flops > 0 and real.ops > 100


def test_real_routing_is_recorded_and_any_routing_model_keeps_the_flops():
    """Each (token, choice) is one expert's work, wherever it goes: the FLOPs and bytes of a
    step do not depend on the routing; its time does (per-op maxima, launches of empty experts)."""
    real = step_cost("moe-debug", 4, H100, tensors="real")
    assert len(real.routing) == 2 and all(sum(r) == 4 * 32 * 2 for r in real.routing)  # B T k choices
    skewed = step_cost("moe-debug", 4, H100, routing=Zipf(2.0))
    assert skewed.flops == real.flops and skewed.bytes == real.bytes
    assert skewed.routing[0][0] == max(skewed.routing[0]) > 2 * min(skewed.routing[0])


def test_by_layers_equals_running_every_layer():
    """Blocks of a kind are identical, so extrapolating from models of 0 and 1 block is exact."""
    for name in ("llama-debug", "moe-debug"):
        full = step_cost(name, 2, H100)
        scaled = by_layers(name, lambda wl: step_cost(wl, 2, H100))
        assert scaled["flops"] == full.flops and scaled["ops"] == full.ops
        assert scaled["seconds"] == pytest.approx(full.seconds, rel=1e-12)
        assert scaled["bytes"] == pytest.approx(full.bytes, rel=1e-12)


def test_zipf_routing_is_balanced_at_zero_and_capped_per_token():
    assert Zipf(0).counts(0, 100, 8, 2) == [13, 13, 13, 13, 12, 12, 12, 12]
    hot = Zipf(3.0).counts(0, 100, 8, 2)
    assert sum(hot) == 100 and hot == sorted(hot, reverse=True)
    assert hot[0] == 50  # 50 tokens, each choosing 2 distinct experts: no expert gets more than 50
    assert balanced() == Zipf(0.0)


def test_a_histogram_scales_to_the_choices_and_keeps_its_shape():
    h = Histogram([[1, 0, 0, 3], [1, 1, 1, 1]])
    assert h.counts(0, 40, 4, 1) == [10, 0, 0, 30]
    assert h.counts(1, 40, 4, 1) == [10, 10, 10, 10]
    assert Histogram([2, 2]).counts(5, 10, 2, 1) == [5, 5]  # one list serves every layer
    assert apportion(7, [1, 1, 1], 3) == [3, 2, 2] or sum(apportion(7, [1, 1, 1], 3)) == 7


@pytest.mark.parametrize("bad,match", [
    (lambda: Zipf(-1), "s = -1 is invalid"),
    (lambda: Histogram([]), "per_layer = .* is invalid"),
    (lambda: Histogram([0, 0]), "per_layer = .* is invalid"),
    (lambda: Histogram([1, 2, 3]).counts(0, 6, 2, 1), "has 3 experts; the model has 2"),
    (lambda: apportion(10, [1, 1], 4), "10 choices cannot be spread over 2 experts of at most 4"),
    (lambda: step_cost("llama-debug", 1, H100, tensors="imaginary"), "tensors = 'imaginary' is unknown"),
    (lambda: step_cost("moe-debug", 1, H100, tensors="real", routing=balanced()), "real tensors route"),
])
def test_bad_routing_and_tensors_say_what_to_give(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_remembered_fake_answers_are_fake_mode_s():
    """fake_ops.FreshOps answers a key's second call from what fake mode answered the first:
    the same metadata, a fresh tensor for a fresh op, the base's storage for a view, the mutated
    argument itself for an in-place op; an op whose output shares an input's storage without
    being a view (_unsafe_view) is never answered from memory."""
    a, mode = torch.ops.aten, FakeTensorMode()
    fresh = FreshOps(mode)
    with mode:
        x, w = torch.empty(8, 16), torch.empty(32, 16)
        cases = [(a.mm.default, (x, w.t())), (a.mul.Tensor, (x, 2.0)), (a.cat.default, ([x, x], 1)),
                 (a.t.default, (w,)), (a.slice.Tensor, (w, 0, 4, 12)), (a.detach.default, (x,)),
                 (a.add_.Tensor, (x, x)), (a._unsafe_view.default, (x, [16, 8])),
                 (a.zeros.default, ([3, 5],))]
        for func, args in cases:
            want = func(*args)
            first, second = fresh.run(func, args, {}), fresh.run(func, args, {})
            for out in (first, second):
                assert isinstance(out, FakeTensor) and out.fake_mode is mode
                assert (out.shape, out.stride(), out.storage_offset(), out.dtype, out.device) == \
                    (want.shape, want.stride(), want.storage_offset(), want.dtype, want.device)
            shares = [second.untyped_storage()._cdata == t.untyped_storage()._cdata for t in args[:1]
                      if isinstance(t, torch.Tensor)]
            if func.is_view or func is a._unsafe_view.default:  # (the latter: fake mode's answer each time)
                assert shares == [True] and second is not args[0]
            elif func is a.add_.Tensor:
                assert second is args[0]
            else:
                assert second is not first and not any(shares)
    assert fresh.memo[fresh._key(a._unsafe_view.default, (x, [16, 8]), {})] is None
    assert sum(v is not None for v in fresh.memo.values()) == len(cases) - 1
