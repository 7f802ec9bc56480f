"""Point-to-point messages a device sends itself (gloo has no pair to itself: they would fail
with 'Pair is not connected'): copied locally on the engine's thread, matched by group and tag
in posting order as messages to peers are, with no link and no emulated time of their own."""

from __future__ import annotations

from collections import deque

import torch
from torch._subclasses.fake_tensor import FakeTensor


class Loopback:
    """One device's messages to itself: per (group members, tag), the sends not yet received or
    the receives not yet sent to, in posting order."""

    def __init__(self):
        self.boxes: dict = {}

    def post(self, kind: str, key: tuple, tensor: torch.Tensor, ready: float, work, payload=None):
        """A send (of `payload`, the engine's copy of `tensor`) or a receive into `tensor`, issued
        at emulated `ready`. A send does not wait for its receive (its copy waits) and ends at
        `ready`; a receive ends when both ends are issued, at once if its send came first, else
        it returns None and the send finishes its `work` (work._done)."""
        box = self.boxes.setdefault(key, deque())
        if kind == "send":
            msg = (tensor.numel(), payload, ready)
            if box and box[0][0] == "recv":
                _, dst, waiting, posted = box.popleft()
                try:
                    waiting._done(_arrive(dst, msg, max(posted, ready)))
                except RuntimeError as e:  # the waiting receive fails now, as the send does
                    waiting._done(ready, e)
                    raise
            else:
                box.append(("send", msg))
            return ready
        if box and box[0][0] == "send":
            msg = box.popleft()[1]
            return _arrive(tensor, msg, max(ready, msg[2]))
        box.append(("recv", tensor, work, ready))
        return None


def _arrive(tensor: torch.Tensor, msg: tuple, end: float) -> float:
    """A message to itself (numel, payload, sent) into `tensor`; returns `end`."""
    numel, payload, _ = msg
    if numel != tensor.numel():
        raise RuntimeError(f"relay: a message to itself of {numel} elements for a receive of {tensor.numel()} "
                           "(send and recv sizes differ?)")
    if isinstance(tensor, FakeTensor):  # (a fake tensor's payload: its constant, or nothing)
        tensor.constant = payload.view(tensor.shape).clone() if payload.numel() else None
    else:
        with torch.no_grad():
            tensor.copy_(payload.view_as(tensor))
    return end
