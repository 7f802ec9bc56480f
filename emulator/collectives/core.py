"""What both executors share, so that they agree to the last bit: the link model (ports and
message timing) and the data semantics (preparing buffers, applying received segments).

Link model. A message of n bytes from i to j uses the link class between them (scale-up inside a
domain, scale-out across, or one its step names, e.g. "switch"), timed by the Fabric (fabric.py):
latency alpha, rate Bps, and a per-message overhead o that occupies the port (LogGP). A message's
wire time w(n) = n / Bps + k h: on a chunked link (the Simple protocol) it moves as k = ceil(n / S)
pipelined chunks of at most S bytes, each paying a handshake h (Timing.wire_s); one message
is still sent, the chunks are a timing notion. Each device has one egress and one ingress port
per class; a port carries one message at a time, so messages that share it are served one after
another in posting order:
    sender:   start = max(ready, egress free);   egress busy until start + o + w(n)
    receiver: begin = max(start + o, ingress free);  ingress busy until begin + w(n)
              arrival = begin + w(n) + alpha
A step ends when its sends have left (egress done) and its receives have arrived. A collective
pays the fabric's fixed cost (launch, protocol set-up) once, before its first step.
"""

from __future__ import annotations

import torch

from relay.collectives.alltoall import split_matrix
from relay.collectives.schedules import Recv, Step, seg_len, shards
from relay.errors import ConfigError


class Ports:
    __slots__ = ("egress", "ingress")

    def __init__(self):
        self.egress: dict[str, float] = {}
        self.ingress: dict[str, float] = {}


def time_sends(rank: int, step: Step, t0: float, ports: Ports, fabric):
    """Emulated start time of each send of `step` (posted at t0), and when the last has left."""
    starts, done = [], t0
    for s in step.sends:
        cls, link = fabric.link(rank, s.peer, step.via)
        n = seg_len(s.segs) * fabric.elem_bytes
        start = max(t0, ports.egress.get(cls, 0.0))
        end = start + link.o_s + link.wire_s(n)
        ports.egress[cls] = end
        starts.append(start)
        done = max(done, end)
    return starts, done


def time_recv(rank: int, recv: Recv, start: float, ports: Ports, fabric, via: str = "") -> float:
    """Arrival time of one message that its sender started at `start`."""
    cls, link = fabric.link(recv.peer, rank, via)
    n = seg_len(recv.segs) * fabric.elem_bytes
    begin = max(start + link.o_s, ports.ingress.get(cls, 0.0))
    ports.ingress[cls] = begin + link.wire_s(n)
    return begin + link.wire_s(n) + link.latency_s


# ---------------------------------------------------------------- data
def gather(buf: torch.Tensor, segs) -> torch.Tensor:
    """The elements of `segs`, contiguous (a view when there is one segment)."""
    if len(segs) == 1:
        return buf[segs[0][0]:segs[0][1]]
    return torch.cat([buf[a:b] for a, b in segs])


REDUCE_OPS = ("sum", "avg", "max", "min", "product")  # avg: a sum, divided at the end (finish)


def apply(buf: torch.Tensor, recv: Recv, payload: torch.Tensor, op: str = "sum") -> None:
    """A received message into `buf`: copied over its segments, or reduced into them with `op`."""
    at = 0
    for a, b in recv.segs:
        part, mine = payload[at:at + b - a], buf[a:b]
        if not recv.reduce:
            mine.copy_(part)
        elif op in ("sum", "avg"):
            mine.add_(part)
        elif op == "product":
            mine.mul_(part)
        elif op == "max":
            torch.maximum(mine, part, out=mine)
        elif op == "min":
            torch.minimum(mine, part, out=mine)
        else:
            raise ConfigError(f"op = {op!r} is unknown; choose one of {', '.join(REDUCE_OPS)}")
        at += b - a


def prepare(primitive: str, rank: int, world: int, tensor: torch.Tensor, layout=None) -> torch.Tensor:
    """The flat working buffer of one rank (a fresh copy; the caller's tensor is left alone).
    all_gather: the input is this rank's shard; the buffer holds all shards, zeros elsewhere.
    all_to_all: `layout` (alltoall.layout_for) places the input; the rank's own block is copied
    to its output here (no schedule sends a rank to itself)."""
    flat = tensor.detach().reshape(-1)
    if primitive == "all_to_all":
        buf = flat.new_zeros(layout.size)  # (fake, like the input, when it is fake)
        buf[:flat.numel()] = flat
        a, b, n = layout.send_at[rank], layout.recv_at[rank], layout.row[rank]
        buf[b:b + n] = flat[a:a + n]
        return buf
    if primitive != "all_gather":
        return flat.clone()
    buf = flat.new_zeros(flat.numel() * world)
    a, b = shards(buf.numel(), world)[rank]
    buf[a:b] = flat
    return buf


def finish(primitive: str, rank: int, world: int, buf: torch.Tensor, op: str, shape, layout=None) -> torch.Tensor:
    """A rank's output from its working buffer: average if asked, its shard for reduce_scatter,
    the output region (flat) for all_to_all."""
    if primitive == "all_to_all":
        return buf[layout.output[0]:layout.output[1]].clone()
    if primitive == "reduce_scatter":
        a, b = shards(buf.numel(), world)[rank]
        buf = buf[a:b].clone()
    if op == "avg":
        if buf.is_floating_point():
            buf = buf / world
        else:
            buf = torch.div(buf, world, rounding_mode="trunc")
    if primitive in ("all_reduce", "broadcast"):
        return buf.reshape(shape)
    if primitive == "all_gather":
        return buf.reshape((world * shape[0],) + tuple(shape[1:])) if len(shape) else buf
    return buf


def reference(primitive: str, tensors: list[torch.Tensor], op: str = "sum", root: int = 0, splits=None):
    """What each rank should get, computed directly (for tests and self-checks)."""
    world = len(tensors)
    if primitive == "all_to_all":  # rank r gets block r of every rank, in rank order
        S = split_matrix(world, tensors[0].numel(), splits)
        starts = [[sum(S[i][:j]) for j in range(world)] for i in range(world)]
        return [torch.cat([tensors[i].reshape(-1)[starts[i][r]:starts[i][r] + S[i][r]] for i in range(world)])
                for r in range(world)]
    if op in ("max", "min", "product"):
        stack = torch.stack([t.reshape(-1) for t in tensors])
        total = {"max": stack.amax, "min": stack.amin, "product": stack.prod}[op](0).to(tensors[0].dtype)
        return [finish(primitive, r, world, total.clone(), "sum", tensors[0].shape) for r in range(world)]
    if primitive == "broadcast":
        return [tensors[root].clone() for _ in range(world)]
    if primitive == "all_gather":
        full = torch.cat([t.reshape(-1) for t in tensors])
        return [finish("all_gather", r, world, full.clone(), "sum", tensors[0].shape) for r in range(world)]
    total = tensors[0].reshape(-1).clone()
    for t in tensors[1:]:
        total += t.reshape(-1)
    return [finish(primitive, r, world, total.clone(), op, tensors[0].shape) for r in range(world)]
