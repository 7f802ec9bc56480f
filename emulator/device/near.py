"""How the transport's steps travel over the shared-memory plane (shm.py): setting the plane up,
and turning a step's sends and receives to same-node peers into the plane's messages. A simple
step (at most one send and one receive, each a single segment that fits in a slot: a ring's step,
a point-to-point message) takes ShmPlane.quick, which makes no object per message: measured in
one process (both ends, no waiting), a one-element send and its receive through Transport.run
took 80 us of host time on the general path and 56 us on this one. Posted point-to-point
messages (the backend's send and recv) go through a Mailbox: rings, a doorbell and a thread of
their own."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import struct
import threading
import time
import uuid
from collections import defaultdict, deque

import torch

from emulator.collectives.schedules import Step, seg_len
from emulator.device.peers import PeerError
from emulator.device.shm import RecvOp, SendOp, ShmPlane, unsupported
from emulator.device.shm_file import POST_BELL, ROOM_TICK_S, SLOTS, TICK_S, alive, memmove, ring, sleep


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


# ---------------------------------------------------------------- posted point-to-point messages
class Posted:
    """A posted message's handle, as gloo's work is to Transport.post's callers: wait(timeout)
    returns once the message has gone (a send) or arrived (a receive), or raises the failure."""

    def __init__(self, mailbox: Mailbox):
        self.mailbox, self.future = mailbox, concurrent.futures.Future()

    def wait(self, timeout) -> bool:
        if not self.future.done():
            self.mailbox.try_progress()  # what has arrived is taken here, without a thread hop
        try:
            self.future.result(timeout.total_seconds())
        except concurrent.futures.TimeoutError:
            raise RuntimeError(f"timed out after {timeout.total_seconds():g} s") from None
        return True


_HDR = struct.Struct("4d")  # a posted receive's header tensor: sender, sequence, bytes, start (float64)


class _PostedRecv:
    """A posted receive: the sender's header (any sender, sequence and sizes; the engine checks
    them) lands in `hdr`, the payload in `area` (the engine's, as over gloo)."""

    def __init__(self, me: int, peer: int, seq: int, hdr: torch.Tensor, area: torch.Tensor | None):
        self.me, self.peer, self.seq, self.hdr, self.area = me, peer, seq, hdr, area
        self.room = area.numel() * area.element_size() if area is not None else 0  # the payload's bytes
        self.at = area.data_ptr() if self.room else 0
        self.off, self.done = 0, False

    def pull(self, ch, bell: int) -> bool:
        r = ch.read()
        if ch.written() == r:
            return False
        k = r % SLOTS
        sender, seq, nbytes, start, off, n = ch.preamble(k)
        n, room = int(n), self.room
        if (int(seq), int(off)) != (self.seq, self.off) or self.off + n > room:
            raise RuntimeError(f"device {self.me}: protocol error, expected posted message {self.seq} from device "
                               f"{self.peer} (at byte {self.off}, at most {room} bytes), got message {int(seq)} "
                               f"(at byte {int(off)}, {int(off) + n} bytes)")
        if n:
            memmove(self.at + self.off, ch.slot_addr[k], n)
        ch.free(r, bell)
        if self.off == 0:  # raw bytes: no torch op on this thread (a dispatch mode may be about)
            memmove(self.hdr.data_ptr(), _HDR.pack(sender, seq, nbytes, start), _HDR.size)
        self.off += n
        self.done = self.off >= room  # the area is the payload's size, as gloo's receive needs it
        return True


class Mailbox:
    """Posted point-to-point messages (Transport.post) to and from same-node peers, on the plane's
    rings of their own, moved by a thread of their own: a posted send must keep going while its
    device's engine runs collectives (the peer may need the whole message before it joins them),
    as gloo's own threads keep a posted gloo send going. Its rings ring a doorbell of their own
    (POST_BELL), so that the schedules' messages never wake this thread, nor posted ones the
    engine's. The thread sleeps on it when nothing moves (it never spins: it would take the core
    from the compute thread) and looks every TICK_S at the processes of the peers it waits on.
    Posting a message and waiting for one also move what can move, in the caller's thread, so a
    small message costs no thread hop where it need not."""

    def __init__(self, plane):
        self.plane, self.lock, self.closed = plane, threading.Lock(), False  # lock: the queues
        self.moving = threading.Lock()  # held by the one thread moving messages at a time
        self.bell_at = plane.mine.addr + POST_BELL
        self.out, self.inn = defaultdict(deque), defaultdict(deque)  # peer -> [(op, handle)], in order
        self.thread = threading.Thread(target=self._loop, name=f"relay-shm-post-{plane.rank}", daemon=True)
        self.thread.start()

    def send(self, peer: int, header: tuple, payload: torch.Tensor | None) -> Posted:
        n = payload.numel() * payload.element_size() if payload is not None else 0
        op = SendOp(peer, header, [(0, payload.data_ptr(), n)] if n else [])
        op.keep = payload  # alive until sent
        return self._add(self.out, op)

    def recv(self, peer: int, seq: int, hdr: torch.Tensor, area: torch.Tensor | None) -> Posted:
        return self._add(self.inn, _PostedRecv(self.plane.rank, peer, seq, hdr, area))

    def _add(self, queues, op) -> Posted:
        handle = Posted(self)
        with self.lock:
            queues[op.peer].append((op, handle))
        self.try_progress()  # a small send goes at once, without a thread hop
        if not handle.future.done():
            ring(self.bell_at)  # wake the thread
        return handle

    def close(self) -> None:
        self.closed = True
        ring(self.bell_at)
        self.thread.join(timeout=5)

    def try_progress(self) -> None:
        """Move what can move now, unless another thread is at it."""
        if self.moving.acquire(blocking=False):
            try:
                self._progress()
            finally:
                self.moving.release()

    def _progress(self) -> tuple[bool, list]:
        """One pass over the first message to and from each peer (one piece each), with `moving`
        held (a ring has one producer and one consumer: one thread moves at a time). Returns
        whether anything moved, and the messages it looked at."""
        plane = self.plane
        with self.lock:
            heads = [(q, p, q[0]) for p, q in (*self.out.items(), *self.inn.items()) if q]
        moved = False
        for q, p, (op, handle) in heads:
            try:
                if isinstance(op, SendOp):
                    moved |= op.push(plane.post_tx[p], plane.files[p].addr + POST_BELL)
                else:
                    moved |= op.pull(plane.post_rx[p], plane.files[p].addr + POST_BELL)
            except Exception as e:  # a protocol error: this message fails, the others go on
                op.done, error = True, e
            else:
                error = None
            if op.done:
                with self.lock:
                    q.popleft()
                handle.future.set_exception(error) if error else handle.future.set_result(None)
        return moved, heads

    def _loop(self) -> None:
        checked = time.monotonic()
        while not self.closed:
            bell = self.plane.mine.bell(POST_BELL)  # before looking (see ShmPlane.exchange)
            with self.moving:
                moved, heads = self._progress()
            if moved:
                continue
            if heads and time.monotonic() - checked >= TICK_S:
                checked = time.monotonic()
                self._fail_dead(heads)
            sending = any(isinstance(op, SendOp) for _, _, (op, _) in heads)  # room: see ROOM_TICK_S
            sleep(self.bell_at, bell, ROOM_TICK_S if sending else TICK_S if heads else 1.0)

    def _fail_dead(self, heads) -> None:
        """Fail every message to or from a peer whose process has ended."""
        for q, p, _ in heads:
            if not alive(self.plane.pids[p]):
                with self.lock:
                    gone = list(q)
                    q.clear()
                for _, handle in gone:
                    handle.future.set_exception(PeerError(self.plane.rank, p, f"its process (pid "
                                                          f"{self.plane.pids[p]}) ended mid-message"))
