"""The throttle: charges every aten op a device runs to that device's compute lane.

It is a TorchDispatchMode, so it sees the ops of the user's model unchanged (forward, backward,
optimizer), executes each for real, asks the cost model what it would cost on the emulated chip,
and charges the lane (which sleeps in wall mode, adds in virtual mode).

Batch scaling (`batch_scale = K`): a device computes a small batch but is charged as if it
computed K times that batch. What grows with the batch is charged K times: every op's FLOPs and
the bytes of activation-shaped tensors. What does not is charged once: the bytes of parameter-
and gradient-shaped tensors (weight reads, weight-gradient writes, gradient accumulation).
`ParameterTensors` decides which tensors those are (see there).

DTensors (tensor parallel's and FSDP2's parameters, their gradients and optimizer state): a mode
sees the DTensor op, before DTensor runs it on each device's local tensors, and never the local
op. What the device computes is the local op, so a DTensor op is charged by its arguments' and
output's local tensors (a column-parallel matmul at 1 / tp of the FLOPs, an FSDP2 optimizer step
on the shard). The parallel plans lay inputs out before each op (parallelize_module's styles),
so the local op runs on those very tensors.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from relay.kernels import flex, fp8, fusion
from relay.kernels.clock import VirtualLane
from relay.kernels.cost import CostModel


class Throttle(TorchDispatchMode):
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        flex.register(cls)  # FlexAttention's operators, charged as a fused kernel (kernels/flex.py)

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
        self.batch_scale = 1.0  # charge as for this many times the batch computed (see the module doc)
        self.fixed = None  # a ParameterTensors: tensors whose bytes batch_scale leaves unscaled
        self.paused = False
        self.ops = 0
        self.flops = 0.0
        self.bytes = 0.0
        self.emulated_s = 0.0  # sum of charged costs
        # while kernels/replay.py records a step: (seconds, flops, bytes) of every charged op
        self.log = None
        self.steered = False  # while logging, an op ran whose result or output shape depends on data
        self.memory = None  # counts every storage an op makes (relay.device.backend.hbm: the emulated HBM)
        # fusion = "fused": the open chain of memory-bound ops (kernels/fusion.py)
        self.fuser = fusion.Fuser(cost_model.tensor_bytes) if cost_model.fusion == "fused" else None

    def execute(self, func, args, kwargs):
        """Runs one op (a subclass may run some ops its own way; the charge is the same)."""
        return func(*args, **(kwargs or {}))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if fp8.defers(types):  # torchao's float8 tensor: its own ops are charged (kernels/fp8.py)
            return NotImplemented
        out = self.execute(func, args, kwargs)
        if self.memory is not None:
            self.memory.track(out)
        if self.paused:
            return out
        if self.sync_cuda:
            torch.cuda.synchronize()
        if self.log is not None and steers(func):
            self.steered = True
        if DTensor in types:  # charged as the local op it runs (see the module's docstring)
            self._charge(func, *_local((args, kwargs or {}, out)))
        else:
            self._charge(func, args, kwargs, out)
        return out

    def _charge(self, func, args, kwargs, out) -> None:
        # the cost model's parts, without an OpCost per op (this runs for every op)
        k, model, fuser = self.batch_scale, self.cost_model, self.fuser
        fixed_of = self.fixed if k != 1.0 else None
        parts = model.op_parts(func, args, kwargs, out, fixed_of, k)
        if parts is None:
            return
        flops, nbytes, fixed, q = parts
        launches = 1
        if fuser is not None and not flops:  # a memory-bound op: in the open chain or a new one
            chained = fuser.memory_bound(func, args, kwargs, out, fixed_of)
            if chained is None:
                return
            launches, nbytes, fixed = chained
        elif fuser is not None:  # a GEMM or attention: ends the chain, reads what it spilled
            spilled, spilled_fixed = fuser.other(args, kwargs)
            nbytes, fixed = nbytes + spilled, fixed + spilled_fixed
        flops, nbytes = flops * k, (nbytes - fixed) * k + fixed
        seconds = model.seconds(flops / q, nbytes, launches)
        if model.fp8:  # a Linear GEMM's FP8 casts, charged with it (kernels/fp8.py)
            casts = model.casts(func, args, fixed_of) if fuser is None else \
                fusion.casts(fuser, func, args, model.itemsize, fixed_of)
            if casts:
                kernels, moved, fixed = casts
                moved = (moved - fixed) * k + fixed
                seconds, nbytes = seconds + model.cast_seconds(kernels, moved), nbytes + moved
        if seconds:
            seconds *= self.slowdown
            self.ops += 1
            self.flops += flops
            self.bytes += nbytes
            self.emulated_s += seconds
            self.lane.charge(seconds)
            if self.log is not None:
                self.log.append((seconds, flops, nbytes))

    @contextlib.contextmanager
    def pause(self):
        """Ops inside are executed but not charged (communication bookkeeping, metrics)."""
        was, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = was


flex.register(Throttle)


def _local(x):
    """x with every DTensor replaced by its local tensor (in lists, tuples and dicts)."""
    if isinstance(x, DTensor):
        return x._local_tensor
    if type(x) in (list, tuple):
        return type(x)(_local(y) for y in x)
    if type(x) is dict:
        return {k: _local(v) for k, v in x.items()}
    return x


_STEERS: dict = {}  # op -> whether it steers (see steers)


def steers(func) -> bool:
    """Whether an op hands data to Python (.item(), bool(t): torch's data_dependent_output tag)
    or makes an output whose shape depends on data (nonzero, bincount, unique: its
    dynamic_output_shape tag). Only through such ops can the data change which ops run next."""
    steers = _STEERS.get(func)
    if steers is None:
        tags = getattr(func, "tags", ())
        steers = _STEERS[func] = torch.Tag.data_dependent_output in tags or torch.Tag.dynamic_output_shape in tags
    return steers


class ParameterTensors:
    """Which tensors are parameter- or gradient-shaped, for batch scaling: a tensor is if it
    shares storage with a parameter (a weight read through any view), or if its shape is a
    parameter's shape, or (for matrices) its transpose, or if it has no dimension.

    Identity alone cannot work: a weight gradient is a fresh tensor (the output of the backward
    matmul, before autograd stores it as .grad), and so are optimizer moments; its shape is what
    marks it. The shape rule is a heuristic: an activation that happens to have exactly a
    parameter's shape (say a (B*T, C) activation when some weight is (B*T, C)) is charged once
    instead of K times. Tensors that really do not grow with the batch, such as a position
    embedding's (T, C) output or a (T, T) causal mask, are charged once too, which is right.
    A bias gradient summed with keepdim, (1, C), is not matched (it is charged K times, a few KB):
    matching it would also match every (1, C) activation of a one-sample batch."""

    def __init__(self, params):
        params = list(params)
        params += [p._local_tensor for p in params if isinstance(p, DTensor)]  # (DTensors are charged by these)
        self.storages = {p.untyped_storage().data_ptr() for p in params}
        shapes = {tuple(p.shape) for p in params}
        self.shapes = shapes | {s[::-1] for s in shapes if len(s) == 2} | {()}

    def __call__(self, t: torch.Tensor) -> bool:
        if tuple(t.shape) in self.shapes:
            return True
        try:
            return t.untyped_storage().data_ptr() in self.storages
        except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, nested)
            return False


def throttled_matmul(a: torch.Tensor, b: torch.Tensor, *, chip, lane=None, dtype="bf16",
                     **efficiency) -> torch.Tensor:
    """a @ b, charged to `lane` (a fresh virtual lane if None) as on `chip` (a catalog Chip) at
    `dtype`."""
    with Throttle(CostModel(chip, dtype, **efficiency), lane or VirtualLane()):
        return a @ b
