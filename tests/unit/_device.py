"""Helpers shared by the unit tests (tests/unit is on the path, no package): one device's virtual
CUDA entered in-process, and one torch thread for tiny tensors."""

from __future__ import annotations

import contextlib

import pytest
import torch

from relay.device.backend import clock, cuda, streams
from relay.device.backend.hbm import Hbm
from relay.hardware import chips
from relay.kernels.cost import CostModel
from relay.kernels.throttle import Throttle
from relay.kernels.timeline import Timeline


@contextlib.contextmanager
def gpu(chip="h100", count=2, index=0, host_clock=False):
    """A program's view of one device: throttle on a timeline, streams, CUDA, clock (as
    backend/program.py enters them for a launched program, without the communication engine)."""
    chip = chips.get(chip)
    cost = CostModel(chip)
    timeline = Timeline(cost.launch_us / 1e6)
    throttle = Throttle(cost, timeline)
    throttle.memory = Hbm(chip)
    with throttle, streams.emulated(timeline, None), cuda.emulated(chip, throttle.memory, count=count, index=index):
        with (contextlib.nullcontext() if host_clock else clock.emulated(timeline)):
            yield timeline, throttle


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: torch's intra-op threads only add hand-offs (seconds on a loaded 2-core host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
