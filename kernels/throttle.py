"""The throttle: charges every aten op a device runs to that device's compute lane.

It is a TorchDispatchMode, so it sees the ops of the user's model unchanged (forward, backward,
optimizer), executes each for real, asks the cost model what it would cost on the emulated chip,
and charges the lane (which sleeps in wall mode, adds in virtual mode).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.clock import VirtualLane
from kernels.cost import CostModel, OpCost


class Throttle(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Otherwise torch wraps __torch_dispatch__ in torch._disable_dynamo, whose first call
        # imports torch._dynamo: ~4 s of start-up in every device process. Relay never compiles
        # inside the throttle.
        return False

    def __init__(self, cost_model: CostModel, lane, sync_cuda: bool = False, slowdown: float = 1.0):
        super().__init__()
        self.cost_model = cost_model
        self.lane = lane
        self.sync_cuda = sync_cuda  # wall clock on a GPU: wait for the kernel before pacing
        self.slowdown = slowdown  # multiplies every cost (a straggler)
        self.work_scale = 1.0  # charge each op for this many times its FLOPs and bytes (not launches)
        self.paused = False
        self.ops = 0
        self.flops = 0.0
        self.bytes = 0.0
        self.emulated_s = 0.0  # sum of charged costs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        if self.sync_cuda:
            torch.cuda.synchronize()
        cost = self.cost_model.op_cost(func, args, kwargs, out)
        if cost.seconds and self.work_scale != 1.0:
            f, b = cost.flops * self.work_scale, cost.bytes * self.work_scale
            cost = OpCost(self.cost_model.seconds(f, b), f, b)
        if cost.seconds:
            seconds = cost.seconds * self.slowdown
            self.ops += 1
            self.flops += cost.flops
            self.bytes += cost.bytes
            self.emulated_s += seconds
            self.lane.charge(seconds)
        return out

    @contextlib.contextmanager
    def pause(self):
        """Ops inside are executed but not charged (communication bookkeeping, metrics)."""
        was, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = was


def throttled_matmul(a: torch.Tensor, b: torch.Tensor, *, chip, lane=None, dtype="bf16",
                     **efficiency) -> torch.Tensor:
    """a @ b, charged to `lane` (a fresh virtual lane if None) as on `chip` (a catalog Chip) at
    `dtype`."""
    with Throttle(CostModel(chip, dtype, **efficiency), lane or VirtualLane()):
        return a @ b
