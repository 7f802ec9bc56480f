"""batch_scale K on batch B is charged as an unscaled step on batch K*B: FLOPs and activation
bytes K times, parameter- and gradient-shaped bytes once (kernels/throttle.py)."""

import pytest
import torch
from torch import nn

from relay import chips
from relay.kernels.clock import VirtualLane
from relay.kernels.cost import CostModel
from relay.kernels.throttle import ParameterTensors, Throttle
from relay.trainer import Optimizer

WIDTH, B, K = 1024, 4, 16  # a wide MLP on a small batch: weight traffic dominates the bytes


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH), nn.GELU(),
                         nn.Linear(WIDTH, 8))


def charged_step(batch: int, batch_scale: int, steps: int = 2):
    """Emulated seconds, FLOPs and bytes of the last of `steps` forward+backward passes (the
    first step creates the gradients; later ones show what zero_grad leaves to accumulate)."""
    model = mlp()
    opt = Optimizer("sgd", model.parameters(), 1e-3)
    x, y = torch.randn(batch, WIDTH), torch.randn(batch, 8)
    for _ in range(steps):
        lane = VirtualLane()
        with Throttle(CostModel(chips.get("h100")), lane) as t:
            t.fixed = ParameterTensors(model.parameters())
            t.batch_scale = batch_scale
            nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return lane.t, t.flops, t.bytes


def test_a_scaled_step_costs_what_the_large_batch_costs():
    seconds, flops, nbytes = charged_step(B, K)
    ref_seconds, ref_flops, ref_bytes = charged_step(K * B, 1)
    assert flops == ref_flops  # every matmul's FLOPs are proportional to the batch: exact
    # bytes and seconds: within 1% (0.45% here). What differs is each bias gradient's sum over
    # the batch: its (1, C) keepdim output is charged K times (ParameterTensors says why).
    assert nbytes == pytest.approx(ref_bytes, rel=1e-2)
    assert seconds == pytest.approx(ref_seconds, rel=1e-2)
    # and parameter traffic matters here: charging it K times (main) would cost far more
    _, _, naive_bytes = charged_step(B, 1)
    assert naive_bytes * K > 2 * ref_bytes


def test_zero_grad_sets_gradients_to_none():
    model = mlp()
    opt = Optimizer("adamw", model.parameters(), 1e-3)
    model(torch.randn(2, WIDTH)).sum().backward()
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_parameter_tensors():
    model = mlp()
    fixed = ParameterTensors(model.parameters())
    w = model[0].weight
    assert fixed(w) and fixed(w.t()) and fixed(w[:3]) and fixed(torch.zeros_like(w))  # storage, shape
    assert not fixed(torch.randn(B, WIDTH)) and not fixed(torch.randn(3, 5))
