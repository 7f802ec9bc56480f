"""What both executors share, so that they agree to the last bit: the link model (ports and
message timing) and the data semantics (preparing buffers, applying received segments).

Link model. A message of n bytes from i to j uses the link class between them (scale-up inside a
domain, scale-out across) with latency alpha and bandwidth beta. Each device has one egress and
one ingress port per class; a port carries one message's bytes at a time, so messages that share
it are served one after another in posting order:
    sender:   start = max(ready, egress free);   egress busy until start + n / beta
    receiver: begin = max(start, ingress free);  ingress busy until begin + n / beta
              arrival = begin + n / beta + alpha
A step ends when its sends have left (egress done) and its receives have arrived.
"""

from __future__ import annotations

import torch

from emulator.collectives.schedules import Recv, Step, seg_len, shards


class Ports:
    __slots__ = ("egress", "ingress")

    def __init__(self):
        self.egress: dict[str, float] = {}
        self.ingress: dict[str, float] = {}


def link_function(system, slowdown: dict | None = None):
    """(i, j) -> (class, Link) for a System; `slowdown` maps a device to a factor on the time of
    every message it sends or receives (a straggler's links)."""
    up, out = system.scaleup, system.scaleout
    dom = system.domain
    if not slowdown:
        return lambda i, j: ("up", up) if i // dom == j // dom else ("out", out)

    def link_of(i, j):
        cls, link = ("up", up) if i // dom == j // dom else ("out", out)
        f = max(slowdown.get(i, 1.0), slowdown.get(j, 1.0))
        return cls, (link if f == 1.0 else type(link)(link.latency_s * f, link.Bps / f))
    return link_of


def time_sends(rank: int, step: Step, t0: float, ports: Ports, link_of, elem_bytes: int):
    """Emulated start time of each send of `step` (posted at t0), and when the last has left."""
    starts, done = [], t0
    for s in step.sends:
        cls, link = link_of(rank, s.peer)
        n = seg_len(s.segs) * elem_bytes
        start = max(t0, ports.egress.get(cls, 0.0))
        ports.egress[cls] = start + n / link.Bps
        starts.append(start)
        done = max(done, start + n / link.Bps)
    return starts, done


def time_recv(rank: int, recv: Recv, start: float, ports: Ports, link_of, elem_bytes: int) -> float:
    """Arrival time of one message that its sender started at `start`."""
    cls, link = link_of(recv.peer, rank)
    n = seg_len(recv.segs) * elem_bytes
    begin = max(start, ports.ingress.get(cls, 0.0))
    ports.ingress[cls] = begin + n / link.Bps
    return begin + n / link.Bps + link.latency_s


# ---------------------------------------------------------------- data
def gather(buf: torch.Tensor, segs) -> torch.Tensor:
    """The elements of `segs`, contiguous (a view when there is one segment)."""
    if len(segs) == 1:
        return buf[segs[0][0]:segs[0][1]]
    return torch.cat([buf[a:b] for a, b in segs])


REDUCE_OPS = ("sum", "avg", "max", "min", "product")  # avg: a sum, divided by the world at the end


def apply(buf: torch.Tensor, recv: Recv, payload: torch.Tensor, op: str = "sum") -> None:
    at = 0
    for a, b in recv.segs:
        part = payload[at:at + b - a]
        if recv.reduce:
            if op in ("sum", "avg"):
                buf[a:b].add_(part)
            elif op == "product":
                buf[a:b].mul_(part)
            elif op == "max":
                torch.maximum(buf[a:b], part, out=buf[a:b])
            elif op == "min":
                torch.minimum(buf[a:b], part, out=buf[a:b])
            else:
                raise ValueError(f"op = {op!r} is unknown; choose one of {', '.join(REDUCE_OPS)}")
        else:
            buf[a:b].copy_(part)
        at += b - a


def prepare(primitive: str, rank: int, world: int, tensor: torch.Tensor, layout=None) -> torch.Tensor:
    """The flat working buffer of one rank (a fresh copy; the caller's tensor is left alone).
    all_gather: the input is this rank's shard; the buffer holds all shards, zeros elsewhere.
    all_to_all: `layout` (alltoall.layout_for) places the input; the rank's own block is copied
    to its output here (no schedule sends a rank to itself)."""
    flat = tensor.detach().reshape(-1)
    if primitive == "all_to_all":
        buf = torch.zeros(layout.size, dtype=flat.dtype, device=flat.device)
        buf[:flat.numel()] = flat
        a, b, n = layout.send_at[rank], layout.recv_at[rank], layout.row[rank]
        buf[b:b + n] = flat[a:a + n]
        return buf
    if primitive != "all_gather":
        return flat.clone()
    buf = torch.zeros(flat.numel() * world, dtype=flat.dtype, device=flat.device)
    a, b = shards(buf.numel(), world)[rank]
    buf[a:b] = flat
    return buf


def finish(primitive: str, rank: int, world: int, buf: torch.Tensor, op: str, shape,
           layout=None) -> torch.Tensor:
    """A rank's output from its working buffer: average if asked, its shard for reduce_scatter,
    the output region for all_to_all (shape: flat)."""
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
    if primitive == "all_to_all":
        from emulator.collectives.alltoall import split_matrix
        S = split_matrix(world, tensors[0].numel(), splits)
        starts = [[sum(S[i][:j]) for j in range(world)] for i in range(world)]
        return [torch.cat([tensors[i].reshape(-1)[starts[i][r]:starts[i][r] + S[i][r]] for i in range(world)])
                for r in range(world)]
    if op in ("max", "min", "product"):
        stack = torch.stack([t.reshape(-1) for t in tensors])
        total = {"max": lambda: stack.amax(0), "min": lambda: stack.amin(0), "product": lambda: stack.prod(0)}[op]()
        return [finish(primitive, r, world, total.to(tensors[0].dtype).clone(), "sum", tensors[0].shape)
                for r in range(world)]
    if primitive == "broadcast":
        return [tensors[root].clone() for _ in range(world)]
    if primitive == "all_gather":
        full = torch.cat([t.reshape(-1) for t in tensors])
        return [finish("all_gather", r, world, full.clone(), "sum", tensors[0].shape) for r in range(world)]
    total = tensors[0].reshape(-1).clone()
    for t in tensors[1:]:
        total += t.reshape(-1)
    return [finish(primitive, r, world, total.clone(), op, tensors[0].shape) for r in range(world)]
