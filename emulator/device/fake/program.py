"""Fake tensors under a program: the plan trainer's fake runs (training/parallel.py) and
`relay launch --tensors fake` (a user's program at full size, shapes only).

The FakeTensorMode stays active for the whole program, below the throttle (an infrastructure
mode, always last on the dispatch stack), so the throttle sees and charges every op as on real
tensors; fake mode's answers are remembered (ops.py). Functional collectives run as in eager mode
(`eager`). Under `relay launch`, a value a program reads from a fake tensor (`.item()`, the loss it
prints) is 0: fake tensors hold no data (the throttle's `fake_scalars`), except a small integer
tensor's that Relay carries beside it (backend/fake_values.py: factories, what is computed from
them, and a top-k over the model's data as balanced routing's round-robin).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.distributed import _functional_collectives as funcol
from torch.distributed import device_mesh
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import _get_current_dispatch_mode

from relay.device.backend import comm_throttle
from relay.device.backend.cuda import Unsupported
from relay.device.fake.ops import FreshOps


@contextlib.contextmanager
def fake_tensors(throttle, *, scalars: bool = False):
    """A FakeTensorMode for the program inside, its answers remembered by `throttle` (a
    CommThrottle); `scalars`: a scalar read from a fake tensor is 0 rather than an error, or the
    value it carries (backend/fake_values.py)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    throttle.fresh, throttle.fake_scalars = FreshOps(mode), scalars
    try:
        with mode, eager(throttle.engine):
            yield mode
    finally:
        throttle.fresh, throttle.fake_scalars = None, False


@contextlib.contextmanager
def launch_fake(throttle):
    """`relay launch --tensors fake`'s context around the program (Program.wrap)."""
    patches = [(torch.utils, "swap_tensors", _swap_or_set(torch.utils.swap_tensors)),
               (device_mesh, "init_device_mesh", _real(device_mesh.init_device_mesh)),
               (dist, "init_device_mesh", _real(dist.init_device_mesh)),
               (DistributedDataParallel, "__init__", _no_ddp)]
    patches += [(device_mesh.DeviceMesh, name, _real(getattr(device_mesh.DeviceMesh, name))) for name in _MESH]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        with fake_tensors(throttle, scalars=True):
            yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


# A device mesh's table of ranks is a tensor read with data-dependent ops (nonzero): made real, as
# the plan trainer makes its meshes before fake mode starts.
_MESH = ("__init__", "__getitem__", "_flatten", "_unflatten")


def _no_ddp(self, *args, **kwargs):
    raise Unsupported("DistributedDataParallel(...) cannot run on fake tensors (--tensors fake): its C++ reducer "
                      "reads the parameters' data; run it with --tensors real, or shard with FSDP2 (fully_shard), "
                      "which runs on fake tensors")


def _real(fn):
    @functools.wraps(fn)
    def real(*args, **kwargs):
        with unset_fake_temporarily():
            return fn(*args, **kwargs)
    return real


def _swap_or_set(swap):
    """Module.to / .cuda / .half on fake parameters swaps them (nn.Module._apply), which torch
    refuses while fake mode's caches hold weak references to them: the parameter takes the
    converted data in place instead (`.data =`, torch's path for real parameters)."""
    def swap_tensors(t1, t2):
        try:
            return swap(t1, t2)
        except RuntimeError as e:
            if "weakref" not in str(e) or not isinstance(t1, FakeTensor):
                raise
            with torch.no_grad():
                t1.data = t2.detach()
    return swap_tensors


@contextlib.contextmanager
def eager(engine):
    """Functional collectives as in eager mode on fake tensors too: torch takes an active fake
    mode for tracing and waits on each result at once (wait_tensor), where eager wraps it and
    waits when it is used (AsyncCollectiveTensor): the same ops and waits as on real tensors.
    `engine`: the device's (engine.py), which a wait below the throttle waits on (_wait_fake)."""
    traced, wait, reduce = funcol._are_we_tracing, funcol.wait_tensor, funcol.all_reduce
    funcol._are_we_tracing, funcol.wait_tensor, funcol.all_reduce = \
        (lambda: False), functools.partial(_wait_fake, engine=engine), _all_reduce_fake
    try:
        yield
    finally:
        funcol._are_we_tracing, funcol.wait_tensor, funcol.all_reduce = traced, wait, reduce


_WAIT, _ALL_REDUCE = funcol.wait_tensor, funcol.all_reduce


def _all_reduce_fake(tensor, reduceOp: str, group, tag: str = ""):
    """funcol.all_reduce issued inside another op's dispatch, below the throttle (loss_parallel's,
    plans.vocab_parallel), where fake mode alone would answer it and no message leave: issued as
    its CPU kernel issues it on real tensors (comm_throttle.py) and waited for at once, as the
    next op there (below the throttle too) waits on real tensors, so fake runs send and wait as
    real ones do. Elsewhere the throttle sees the op and issues it (CommThrottle.execute). Only
    all_reduce is issued so: an all-gather or reduce-scatter made inside another op's dispatch on fake
    tensors would still send nothing (no plan makes one)."""
    if isinstance(tensor, FakeTensor) and isinstance(_get_current_dispatch_mode(), FakeTensorMode):
        group = funcol._group_or_group_name(funcol._resolve_group(group, tag))
        return comm_throttle.all_reduce(tensor, reduceOp.lower(), group, async_op=False)
    return _ALL_REDUCE(tensor, reduceOp, group, tag)


def _wait_fake(tensor, engine):
    """funcol.wait_tensor answered as fake mode answers it (its Meta kernel: empty_like) where fake
    mode alone sees it (an AsyncCollectiveTensor used inside an op's dispatch, below the throttle,
    which charges nothing there): fake mode's path for ops outside aten costs 0.5 ms, and a
    full-size MoE stage waits 18,000 times a step. The wait itself is the engine's
    (Engine.wait_for_inputs), as on real tensors c10d's work registry waits for the operation
    that wrote the tensor: where the throttle saw the tensor only inside another (a DTensor whose
    local tensor it is: sequence parallelism's reduce-scatters, `redistribute(..., async_op=True)`),
    the program's clock holds for it here, and the engine lets go of the operation and its output
    (kept until the program's end otherwise, counted in the emulated HBM)."""
    if isinstance(tensor, FakeTensor) and isinstance(_get_current_dispatch_mode(), FakeTensorMode):
        engine.wait_for_inputs((tensor,))
        return torch.empty_like(tensor)
    return _WAIT(tensor)
