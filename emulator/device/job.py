"""What every device of one run needs to know: the `Job` (system, clock, cost settings,
timeouts, injected faults), sent with each function the driver runs on the devices, so one set
of workers serves a whole sweep of chips and device counts."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

from relay.collectives.fabric import Fabric
from relay.errors import ConfigError
from relay.hardware.system import System
from relay.kernels.clock import make_lane
from relay.kernels.cost import CostModel
from relay.kernels.throttle import Throttle


@dataclass(frozen=True)
class Faults:
    """Faults injected on purpose, for experiments and tests."""
    fail: tuple[int, int] | None = None  # (device, step): that device's process dies at that step
    #                                      (a training step, or a collective's schedule step)
    compute_slowdown: dict = field(default_factory=dict)  # device -> factor on every op's cost
    link_slowdown: dict = field(default_factory=dict)  # device -> factor on its links' time

    def check(self, devices: int) -> None:
        for what, d in ([("fail", self.fail[0])] if self.fail else []) + \
                [("straggler", d) for d in (*self.compute_slowdown, *self.link_slowdown)]:
            if not (isinstance(d, int) and 0 <= d < devices):
                raise ConfigError(f"{what}: device = {d!r} is not a device; give 0..{devices - 1}")
        if self.fail and not (isinstance(self.fail[1], int) and self.fail[1] >= 0):
            raise ConfigError(f"fail: step = {self.fail[1]!r} is invalid; give a step >= 0")
        for d, x in (*self.compute_slowdown.items(), *self.link_slowdown.items()):
            if not (isinstance(x, (int, float)) and x >= 1):
                raise ConfigError(f"straggler: slowdown = {x!r} for device {d} is invalid; give a factor >= 1")

    def fails_here(self, device: int, step: int) -> bool:
        return self.fail is not None and self.fail == (device, step)


@dataclass(frozen=True)
class Job:
    """What every device of one run needs to know; sent with each call."""
    system: System
    clock: str = "virtual"  # "virtual" | "wall"
    dilation: float | None = None  # wall clock: real seconds per emulated second
    epoch: float | None = None  # wall clock: real time (time.time()) of emulated 0, shared
    dtype: str = "bf16"  # emulated dtype of floating tensors
    efficiency: dict = field(default_factory=dict)  # matmul_eff, mem_eff, launch_us overrides
    timeout_s: float = 30.0  # how long a device waits for a peer before failing
    faults: Faults = field(default_factory=Faults)

    def lane(self):
        return make_lane(self.clock, self.dilation, self.epoch)

    def cost_model(self, rank: int = 0) -> CostModel:
        return CostModel(self.system.chip_of(rank), self.dtype, **self.efficiency)

    def throttle(self, rank: int, lane, device: str = "cpu") -> Throttle:
        return Throttle(self.cost_model(rank), lane, sync_cuda=device == "cuda" and self.clock == "wall",
                        slowdown=self.faults.compute_slowdown.get(rank, 1.0))

    def fabric(self, elem_bytes: int = 4) -> Fabric:
        """The system's calibrated fabric for buffers of `elem_bytes`, any straggler's links slowed."""
        return Fabric.of(self.system, elem_bytes, self.faults.link_slowdown)


def die() -> None:
    """An injected failure: this device's process ends at once, as a crash would end it."""
    os.kill(os.getpid(), signal.SIGKILL)
