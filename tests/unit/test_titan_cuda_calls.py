"""CUDA calls torchtitan 0.3.0 makes on its train path, on the virtual CUDA device (NEEDS.md lists
them all; tests/unit/test_virtual_cuda.py covers the device's own calls)."""

from __future__ import annotations

import contextlib

import torch

from relay.device.backend import clock, cuda, streams
from relay.device.backend.hbm import Hbm
from relay.hardware import chips
from relay.kernels.cost import CostModel
from relay.kernels.throttle import Throttle
from relay.kernels.timeline import Timeline


@contextlib.contextmanager
def gpu(chip="h100", count=2, index=0):
    chip = chips.get(chip)
    cost = CostModel(chip)
    timeline = Timeline(cost.launch_us / 1e6)
    throttle = Throttle(cost, timeline)
    throttle.memory = Hbm(chip)
    with throttle, streams.emulated(timeline, None), cuda.emulated(chip, throttle.memory, count=count, index=index):
        with clock.emulated(timeline):
            yield timeline, throttle


def test_seeding_through_torch_and_torch_cuda():
    """torch.manual_seed calls torch.cuda.manual_seed_all where CUDA is available (torchtitan's
    set_determinism does both): the device's seed is the host generator's, without recursion."""
    with gpu():
        torch.manual_seed(7)
        a = torch.randn(4, device="cuda")
        torch.cuda.manual_seed_all(7)
        b = torch.randn(4, device="cuda")
        torch.cuda.manual_seed(7)
        c = torch.randn(4, device="cuda")
        torch.seed()
        torch.cuda.seed_all()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
