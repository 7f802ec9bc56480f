"""Helpers shared by the unit tests (tests/unit is on the path, no package): one device's virtual
CUDA entered in-process, and one torch thread for tiny tensors."""

from __future__ import annotations

import contextlib

import pytest
import torch

from relay import System
from relay.collectives import Fabric
from relay.device.backend import clock, cuda, streams
from relay.device.backend.comm_throttle import CommThrottle
from relay.device.backend.engine import Engine
from relay.device.backend.hbm import Hbm
from relay.device.fake.program import launch_fake
from relay.hardware import chips
from relay.kernels.clock import VirtualLane
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


@contextlib.contextmanager
def launched(fake: bool):
    """One emulated H100 as `relay launch` runs a program on it (a device's throttle with its
    communication engine, streams, CUDA), on fake tensors or real ones."""
    system, chip = System("h100", 1), chips.get("h100")
    cost = CostModel(chip)
    timeline = Timeline(cost.launch_us / 1e6)
    engine = Engine(0, None, system, Fabric.of(system), timeline, VirtualLane(), 10.0)
    throttle = CommThrottle(engine, cost, timeline)
    throttle.memory = Hbm(chip)
    try:
        with throttle, streams.emulated(timeline, engine), cuda.emulated(chip, throttle.memory, count=1, index=0):
            with launch_fake(throttle) if fake else contextlib.nullcontext():
                yield
    finally:
        engine.close()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: torch's intra-op threads only add hand-offs (seconds on a loaded 2-core host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
