"""How the transport's steps travel over the shared-memory plane (shm.py): setting the plane up,
and turning a step's sends and receives to same-node peers into the plane's messages. A simple
step (at most one send and one receive, each a single segment that fits in a slot: a ring's step,
a point-to-point message) takes ShmPlane.quick, which makes no object per message: measured in
one process (both ends, no waiting), a one-element send and its receive through Transport.run
took 80 us of host time on the general path and 56 us on this one. Posted point-to-point
messages (the backend's send and recv) go through a Mailbox (mailbox.py): rings, a doorbell and
a thread of their own."""

from __future__ import annotations

import functools
import os
import uuid

import torch

from relay.collectives.schedules import Step, seg_len
from relay.device.plane.mailbox import Mailbox
from relay.device.plane.shm import RecvOp, SendOp, ShmPlane, unsupported


def recvs(t, step: Step, buf, dtype, elem_bytes: int, staged: dict, dev, op: str) -> dict:
    """The shared-memory receives of `step`: straight into `buf` where that is safe (and the
    reduction a sum), else into a staging area (recorded in `staged`) applied with the gloo
    ones, in list order; with no `buf`, headers alone."""
    landing = [d and (op in ("sum", "avg") or not r.reduce) for d, r in zip(direct(step), step.recvs)]
    ops, stage_at = {}, 0
    need = sum(seg_len(r.segs) for i, r in enumerate(step.recvs) if dev(r.peer) in t.near and not landing[i])
    area = t._scratch(-1, need, dtype) if need and buf is not None else None
    for i, r in enumerate(step.recvs):
        peer = dev(r.peer)
        if peer not in t.near:
            continue
        seq = t.got[peer]
        t.got[peer] += 1
        n = seg_len(r.segs)
        if buf is None:
            ops[i] = RecvOp(t.rank, peer, seq, n * elem_bytes, [], r.reduce)
        elif landing[i]:
            views, at = [], 0
            for a, b in r.segs:
                if b > a:
                    views.append((at, buf[a:b]))
                    at += (b - a) * buf.element_size()
            ops[i] = RecvOp(t.rank, peer, seq, n * elem_bytes, views, r.reduce)
        else:  # (an empty receive stages nothing: the area is None when every staged one is empty)
            staged[i] = area[stage_at:stage_at + n] if n else buf[:0]
            ops[i] = RecvOp(t.rank, peer, seq, n * elem_bytes, [(0, staged[i])] if n else [], False)
            stage_at += n
    return ops


@functools.lru_cache(maxsize=4096)
def simple(step: Step) -> bool:
    """Whether `step` is at most one send and one receive (a ring's step, a point-to-point
    message), each a single segment, the receive landing straight in the buffer (direct)."""
    if len(step.sends) > 1 or len(step.recvs) > 1 or not (step.sends or step.recvs):
        return False
    return all(len(m.segs) == 1 for m in (*step.sends, *step.recvs)) and all(direct(step))


def quick_step(t, step: Step, starts: list, buf, elem_bytes: int, dev, op: str):
    """A simple step (`simple`) over shared memory with ShmPlane.quick, when its peers are on
    this node, the messages fit in a slot and a receive reduces, if at all, by sum. Returns the
    incoming message's emulated start (None without one), or False, having moved nothing, when
    the step must take the general path."""
    e, base = (buf.element_size(), buf.data_ptr()) if buf is not None else (0, 0)
    out = inn = None
    if step.sends:
        s = step.sends[0]
        peer, ((a, b),) = dev(s.peer), s.segs
        if peer not in t.near or (b - a) * e > t.plane.tx[peer].size:
            return False
        out = (peer, (t.rank, t.sent[peer], (b - a) * elem_bytes, starts[0]), base + a * e, (b - a) * e)
    if step.recvs:
        r = step.recvs[0]
        peer, ((a, b),) = dev(r.peer), r.segs
        if peer not in t.near or (b - a) * e > t.plane.rx[peer].size or (r.reduce and op not in ("sum", "avg")):
            return False
        # a copy lands by address (no tensor made: host time), a sum adds into a view
        inn = (peer, t.got[peer], (b - a) * elem_bytes, (b - a) * e, buf[a:b] if r.reduce and e else base + a * e)
    start = t.plane.quick(out, inn)
    if start is False:  # the ring to the peer is full: exchange waits for room
        sends = [SendOp(out[0], out[1], [(0, out[2], out[3])] if out[3] else [])] if out else []
        into = [(0, buf[a:b])] if inn and inn[3] else []
        recvs = [RecvOp(t.rank, inn[0], inn[1], inn[2], into, r.reduce)] if inn else []
        t.plane.exchange(sends, recvs)
        start = recvs[0].start if recvs else None
    if out:
        t.sent[out[0]] += 1
    if inn:
        t.got[inn[0]] += 1
    return start


def open_plane(t, node: str | None, timeout_s: float) -> None:
    """The shared-memory plane to the devices on this node (every device calls this at once)."""
    ok = node is not None and unsupported() is None
    me = (node, os.getpid(), ok, uuid.uuid4().hex[:12])
    everyone = t.meet(me)
    peers = {r: pid for r, (n, pid, their_ok, _) in enumerate(everyone)
             if r != t.rank and ok and their_ok and n == node}
    # the token (rank 0's) names this group's files apart from any other run on the host
    t.plane = ShmPlane(t.rank, peers, everyone[0][3], timeout_s, t.meet)
    t.near = frozenset(peers)
    t.mailbox = Mailbox(t.plane) if peers else None


def send(peer: int, s, header: tuple, buf: torch.Tensor | None) -> SendOp:
    """A shared-memory send of the segments of `s`, by address: no tensor made per segment (a
    strided buffer is copied first: sends read it as it is now). No buffer: the header alone."""
    if buf is None:
        return SendOp(peer, header, [])
    buf = buf if buf.is_contiguous() else buf.contiguous()
    e, base, at, spans = buf.element_size(), buf.data_ptr(), 0, []
    for a, b in s.segs:
        if b > a:
            spans.append((at, base + a * e, (b - a) * e))
            at += (b - a) * e
    op = SendOp(peer, header, spans)
    op.keep = buf  # a copy, if one was made, lives as long as the message
    return op


@functools.lru_cache(maxsize=4096)  # the same steps recur every collective: host time per step
def direct(step: Step) -> tuple[bool, ...]:
    """Which receives of `step` may land in the buffer piece by piece, as they arrive: those whose
    segments meet no send's (sends read the buffer as it was at the start of the step) and no
    other receive's (overlapping receives apply in list order, so sums keep one order)."""
    out = []
    for i, r in enumerate(step.recvs):
        others = [g for s in step.sends for g in s.segs]
        others += [g for j, q in enumerate(step.recvs) if j != i for g in q.segs]
        out.append(not any(a < d and c < b for a, b in r.segs for c, d in others))
    return tuple(out)
