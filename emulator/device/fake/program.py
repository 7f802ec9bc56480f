"""Fake tensors under a program: the plan trainer's fake runs (training/parallel.py) and
`relay launch --tensors fake` (a user's program at full size, shapes only).

The FakeTensorMode stays active for the whole program, below the throttle (an infrastructure
mode, always last on the dispatch stack), so the throttle sees and charges every op as on real
tensors; fake mode's answers are remembered (ops.py). Functional collectives run as in eager mode
(`eager`). Under `relay launch`, a value a program reads from a fake tensor (`.item()`, the loss it
prints) is 0: fake tensors hold no data (the throttle's `fake_scalars`).
"""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed import _functional_collectives as funcol
from torch.utils._python_dispatch import _get_current_dispatch_mode

from relay.device.fake.ops import FreshOps


@contextlib.contextmanager
def fake_tensors(throttle, *, scalars: bool = False):
    """A FakeTensorMode for the program inside, its answers remembered by `throttle` (a
    CommThrottle); `scalars`: a scalar read from a fake tensor is 0 rather than an error."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    throttle.fresh, throttle.fake_scalars = FreshOps(mode), scalars
    try:
        with mode, eager():
            yield mode
    finally:
        throttle.fresh, throttle.fake_scalars = None, False


def launch_fake(throttle):
    """`relay launch --tensors fake`'s context around the program (Program.wrap)."""
    return fake_tensors(throttle, scalars=True)


@contextlib.contextmanager
def eager():
    """Functional collectives as in eager mode on fake tensors too: torch takes an active fake
    mode for tracing and waits on each result at once (wait_tensor), where eager wraps it and
    waits when it is used (AsyncCollectiveTensor): the same ops and waits as on real tensors."""
    traced, wait = funcol._are_we_tracing, funcol.wait_tensor
    funcol._are_we_tracing, funcol.wait_tensor = (lambda: False), _wait_fake
    try:
        yield
    finally:
        funcol._are_we_tracing, funcol.wait_tensor = traced, wait


_WAIT = funcol.wait_tensor


def _wait_fake(tensor):
    """funcol.wait_tensor answered as fake mode answers it (its Meta kernel: empty_like) where fake
    mode alone sees it (an AsyncCollectiveTensor used inside an op's dispatch, below the throttle,
    which charges nothing there): fake mode's path for ops outside aten costs 0.5 ms, and a
    full-size MoE stage waits 18,000 times a step. The wait itself is Engine.wait_for_inputs'."""
    if isinstance(tensor, FakeTensor) and isinstance(_get_current_dispatch_mode(), FakeTensorMode):
        return torch.empty_like(tensor)
    return _WAIT(tensor)
