"""Point-to-point messages to peers, as the device's engine (engine.py) posts them on its thread:
a header (sender, tag, bytes, emulated start) and the payload through the transport
(Transport.post), timed on the engine's ports of their own."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from relay.collectives.core import time_recv, time_sends
from relay.collectives.schedules import Recv, Send, Step
from relay.device.backend.collective import Group
from relay.device.plane.transport import P2P_TAG_SPACES


class PointToPoint:
    """The engine's (engine.py) point-to-point messages to peers, posted on its thread."""

    def send(self, group: Group, tensor: torch.Tensor, peer: int, ready: float, work, tag: int = 0) -> None:
        """Post one message to group rank `peer` (header and payload, as the transport sends)."""
        payload = message_payload(tensor)
        numel, nbytes = tensor.numel(), tensor.numel() * tensor.element_size()
        step = Step(sends=(Send(peer, ((0, numel),)),))
        fabric = group.fabric.with_(elem_bytes=tensor.element_size())
        starts, done = time_sends(group.rank, step, max(ready, self.comm.scheduled()), self._p2p_ports, fabric)
        hdr = torch.tensor([group.rank, tag, nbytes, starts[0]], dtype=torch.float64)
        seq, works = self.transport.post("send", group.members[peer], [hdr, payload], tag)
        self.spans.append(("send", starts[0], done, nbytes))
        self._post(works, lambda keep=(hdr, payload): done, work)  # keep: alive until sent

    def recv(self, group: Group, tensor: torch.Tensor, peer: int, ready: float, work, tag: int = 0) -> None:
        fake = isinstance(tensor, FakeTensor)
        area = torch.empty(0 if fake and tensor.numel() > FAKE_CONSTANT else tensor.numel(), dtype=tensor.dtype)
        hdr = torch.empty(4, dtype=torch.float64)
        seq, works = self.transport.post("recv", group.members[peer], [hdr, area], tag)
        nbytes = tensor.numel() * tensor.element_size()

        def finish() -> float:
            sender, got_tag, got, start = hdr.tolist()
            if (int(sender), int(got_tag), int(got)) != (peer, tag, nbytes):
                why = "send and recv sizes differ?" if int(got_tag) == tag else \
                    f"over gloo, tags equal modulo {P2P_TAG_SPACES} share its tags: use tags that differ modulo it"
                raise RuntimeError(f"relay: device {self.device}: expected message {seq} of tag {tag}, {nbytes} "
                                   f"bytes, from group rank {peer}, got one of tag {int(got_tag)}, {int(got)} "
                                   f"bytes, from group rank {int(sender)} ({why})")
            fabric = group.fabric.with_(elem_bytes=tensor.element_size())
            arrival = time_recv(group.rank, Recv(peer, ((0, tensor.numel()),), False), start,
                                self._p2p_ports, fabric)
            if fake:
                tensor.constant = area.view(tensor.shape).clone() if area.numel() else None
            else:
                with torch.no_grad():
                    tensor.copy_(area.view_as(tensor))
            self.spans.append(("recv", start, arrival, nbytes))
            return max(ready, arrival)
        self._post(works, finish, work)


FAKE_CONSTANT = 1  # elements of a fake tensor that travel: FakeTensorMode's constants (its CONSTANT_NUMEL_LIMIT)


def message_payload(tensor: torch.Tensor) -> torch.Tensor:
    """What a point-to-point message carries: the tensor's data; for a fake tensor (shapes only),
    nothing, except that a one-element one carries its constant (FakeTensorMode propagates
    those, so a value torch reads with .item(), as pipelining's start-up vote does, still
    arrives; an unknown one arrives as 0)."""
    if not isinstance(tensor, FakeTensor):
        return tensor.detach().reshape(-1).contiguous().clone()
    with unset_fake_temporarily():
        if tensor.numel() > FAKE_CONSTANT:
            return torch.empty(0, dtype=tensor.dtype)
        c = tensor.constant
        return c.reshape(-1).clone() if c is not None else torch.zeros(tensor.numel(), dtype=tensor.dtype)
