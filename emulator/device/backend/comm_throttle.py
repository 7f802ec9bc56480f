"""The device's throttle (kernels/throttle.py) made to work with its communication engine
(engine.py): a compute op waits for the communication that writes its inputs, and functional
collectives on fake tensors are issued as torch's kernels issue them."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _resolve_process_group
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor

from relay.device.backend import fake_values as values
from relay.kernels.throttle import Throttle, steers


class CommThrottle(Throttle):
    """The device's throttle, made to wait for communication whose results an op reads."""

    def __init__(self, engine, *args, **kwargs):  # engine: the device's Engine (engine.py)
        super().__init__(*args, **kwargs)
        self.engine = engine
        self.fresh = None  # a fake_ops.FreshOps while a program runs on fake tensors
        self.fake_scalars = False  # `relay launch --tensors fake`: a scalar read from a fake tensor is 0, or
        # its value under balanced routing (backend/fake_values.py)
        self.host_syncs = hasattr(self.lane, "host_sync")  # a Timeline: the host can run ahead

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE:  # see _DEVICE
            return func(*args)
        if self.paused:
            return super().__torch_dispatch__(func, types, args, kwargs)
        if func is not _WRAP:  # wrapping a collective's output (eager funcol) reads nothing: no wait
            self.engine.wait_for_inputs((args, kwargs))
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.host_syncs and steers(func):  # .item() and the like: the host waits for the stream
            self.lane.host_sync()
        return out

    def execute(self, func, args, kwargs):
        if func in _FUNCTIONAL and isinstance(args[0], FakeTensor):
            out = _FUNCTIONAL[func](*args)
            if self.fake_scalars:
                values.after(func, args, {}, out)
            return out
        scalar = args[0]._local_tensor if func is _SCALAR and isinstance(args[0], DTensor) else args[0]
        if func is _SCALAR and self.fake_scalars and isinstance(scalar, FakeTensor):
            if scalar.constant is not None:  # a fake tensor made from a Python number: its value
                return scalar.constant.item()  # (nn.init.trunc_normal_'s bounds, new_tensor(a).item())
            if (value := values.read(scalar)) is not None:  # a count under balanced routing (backend/fake_values.py)
                return value
            return False if scalar.dtype == torch.bool else 0  # a program's .item() on fake tensors reads 0
        out = self.fresh.run(func, args, kwargs or {}) if self.fresh is not None else func(*args, **(kwargs or {}))
        if self.fake_scalars:
            values.after(func, args, kwargs or {}, out)
        return out


# A fake tensor's device, asked for by torch's C++ code (autograd, about half of all dispatches of a
# fake-tensor step): no kernel and nothing read, answered by fake mode at once. Real tensors never
# dispatch it, so it neither waits for communication nor passes the throttle.
_DEVICE = torch.ops.prim.device.default
_SCALAR = torch.ops.aten._local_scalar_dense.default

# Functional collectives (DTensor's, all_to_all_single_autograd's) on fake tensors: FakeTensorMode
# would answer them from their shape rule alone and no message would leave, so they are issued as
# their CPU kernels issue them (torch/csrc/distributed/c10d/Functional.cpp): an output made like
# the input, one process-group call; the op that reads the output waits (Engine.wait_for_inputs).
_F = torch.ops._c10d_functional
_WRAP = _F._wrap_tensor_autograd.default
_REDUCE = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "product": dist.ReduceOp.PRODUCT,
           "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def _pg(group):
    return group if isinstance(group, dist.ProcessGroup) else _resolve_process_group(group)


def all_reduce(inp, op, group, async_op: bool = True):
    out = inp.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=_REDUCE[op], group=_pg(group), async_op=async_op)
    return out


def _all_gather(inp, size, group):
    out = inp.new_empty((inp.shape[0] * size, *inp.shape[1:]))
    dist.all_gather_into_tensor(out, inp.contiguous(), group=_pg(group), async_op=True)
    return out


def _reduce_scatter(inp, op, size, group):
    out = inp.new_empty((inp.shape[0] // size, *inp.shape[1:]))
    dist.reduce_scatter_tensor(out, inp.contiguous(), op=_REDUCE[op], group=_pg(group), async_op=True)
    return out


def _all_to_all(inp, out_splits, in_splits, group):
    out = inp.new_empty((sum(out_splits), *inp.shape[1:]))
    dist.all_to_all_single(out, inp.contiguous(), list(out_splits), list(in_splits), group=_pg(group), async_op=True)
    return out


def _wait(inp):
    # what fake mode answers (the Meta kernel's empty_like), without its general path for ops outside
    # aten (0.5 ms against 0.17: a full-size MoE step waits 30,000 times); the wait itself is
    # Engine.wait_for_inputs', before
    return torch.empty_like(inp)


_FUNCTIONAL = {_F.all_reduce.default: all_reduce, _F.all_gather_into_tensor.default: _all_gather,
               _F.reduce_scatter_tensor.default: _reduce_scatter, _F.all_to_all_single.default: _all_to_all,
               # the result waited for when used, as eager wraps it (fake mode's rule makes a fresh tensor)
               _F._wrap_tensor_autograd.default: AsyncCollectiveTensor, _F.wait_tensor.default: _wait}
