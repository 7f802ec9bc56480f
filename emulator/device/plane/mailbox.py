"""Posted point-to-point messages (the `relay` backend's send and recv) over the shared-memory
plane: a Mailbox per device, with rings, a doorbell and a thread of their own (near.py opens
it with the plane), matching messages to receives by peer and tag as gloo does."""

from __future__ import annotations

import concurrent.futures
import ctypes
import struct
import threading
import time
from collections import defaultdict, deque

import torch

from relay.device.plane.peers import PeerError
from relay.device.plane.shm import SendOp
from relay.device.plane.shm_file import POST_BELL, ROOM_TICK_S, SLOTS, TICK_S, alive, memmove, ring, sleep


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


_HDR = struct.Struct("4d")  # a posted receive's header tensor: sender, tag, bytes, start (float64)


class _PostedRecv:
    """A posted receive of tag `tag`: the sender's header (the engine checks sender and sizes)
    lands in `hdr`, the payload in `area` (the engine's, as over gloo), bytes alone: no torch op
    on the mailbox's thread (a dispatch mode may be about)."""

    def __init__(self, peer: int, tag: int, hdr: torch.Tensor, area: torch.Tensor | None):
        self.peer, self.tag, self.hdr, self.area = peer, tag, hdr, area
        self.room = area.numel() * area.element_size() if area is not None else 0  # the payload's bytes
        self.at = area.data_ptr() if self.room else 0


class _Arrival:
    """A posted message coming off a peer's ring, a piece at a time (each piece's preamble says
    its tag, offset and the message's payload bytes): straight into the receive posted for its
    tag, or, when none is posted yet, into a buffer of its own, kept until one is (an early
    message: gloo matches sends and receives by peer and tag, whatever order they are posted in)."""

    def __init__(self, me: int, peer: int, tag: int, total: int, receive: tuple | None):
        self.me, self.peer, self.tag, self.total = me, peer, tag, total
        self.receive = receive  # (_PostedRecv, Posted), or None until a receive of this tag is posted
        self.buf = None if receive else ctypes.create_string_buffer(max(1, total))
        self.off, self.done, self.header, self.error = 0, False, None, None

    def pull(self, ch, bell: int) -> bool:
        r = ch.read()
        if ch.written() == r:
            return False
        k = r % SLOTS
        sender, tag, nbytes, start, off, n, total = ch.preamble(k)
        n = int(n)
        if (int(tag), int(off), int(total)) != (self.tag, self.off, self.total):
            raise RuntimeError(f"device {self.me}: protocol error, expected the piece at byte {self.off} of a posted "
                               f"message of tag {self.tag} ({self.total} bytes) from device {self.peer}, got the "
                               f"piece at byte {int(off)} of one of tag {int(tag)} ({int(total)} bytes)")
        at, room = (ctypes.addressof(self.buf), self.total) if self.buf is not None else \
            (self.receive[0].at, self.receive[0].room)
        if n and self.off < room:  # (a receive of another size takes what fits, then fails)
            memmove(at + self.off, ch.slot_addr[k], min(n, room - self.off))
        ch.free(r, bell)
        if self.off == 0:
            self.header = (sender, tag, nbytes, start)
        self.off += n
        self.done = self.off >= self.total
        return True

    def deliver(self) -> None:
        """The whole message has arrived and its receive is posted: hand it over."""
        recv, handle = self.receive
        if self.error is not None:
            handle.future.set_exception(self.error)
            return
        if self.buf is not None and recv.room:
            memmove(recv.at, ctypes.addressof(self.buf), min(self.total, recv.room))
        memmove(recv.hdr.data_ptr(), _HDR.pack(*self.header), _HDR.size)
        if self.total != recv.room:
            handle.future.set_exception(RuntimeError(
                f"device {self.me}: a posted message of tag {self.tag} from device {self.peer} holds {self.total} "
                f"bytes, its receive {recv.room} (send and recv sizes differ?)"))
        else:
            handle.future.set_result(None)


class Mailbox:
    """Posted point-to-point messages (Transport.post) to and from same-node peers, on the plane's
    rings of their own, moved by a thread of their own: a posted send must keep going while its
    device's engine runs collectives (the peer may need the whole message before it joins them),
    as gloo's own threads keep a posted gloo send going. Its rings ring a doorbell of their own
    (POST_BELL), so that the schedules' messages never wake this thread, nor posted ones the
    engine's. The thread sleeps on it when nothing moves (it never spins: it would take the core
    from the compute thread) and looks every TICK_S at the processes of the peers it waits on.
    Posting a message and waiting for one also move what can move, in the caller's thread, so a
    small message costs no thread hop where it need not.

    Messages travel in posting order on one ring per peer, and are matched to receives by tag:
    a receive takes the first message of its peer and tag that no receive has taken. A message
    whose tag no posted receive waits for is taken off the ring into a buffer (_Arrival) while
    some receive from its peer waits, so a message behind it can arrive."""

    def __init__(self, plane):
        self.plane, self.lock, self.closed = plane, threading.Lock(), False  # lock: the queues
        self.moving = threading.Lock()  # held by the one thread moving messages at a time
        self.bell_at = plane.mine.addr + POST_BELL
        self.out, self.inn = defaultdict(deque), defaultdict(deque)  # peer -> [(op, handle)], in posting order
        self.early = defaultdict(deque)  # peer -> [_Arrival] taken off the ring before a receive of their tag
        self.arriving: dict[int, _Arrival] = {}  # peer -> the message coming off its ring now (`moving` held)
        self.broken: dict[int, Exception] = {}  # peer -> the protocol error that left its ring past use
        self.thread = threading.Thread(target=self._loop, name=f"relay-shm-post-{plane.rank}", daemon=True)
        self.thread.start()

    def send(self, peer: int, header: tuple, payload: torch.Tensor | None) -> Posted:
        """header: (sender, tag, bytes, start), as the receiver's header tensor gets it."""
        n = payload.numel() * payload.element_size() if payload is not None else 0
        op = SendOp(peer, header, [(0, payload.data_ptr(), n)] if n else [])
        op.keep = payload  # alive until sent
        return self._add(self.out, op)

    def recv(self, peer: int, tag: int, hdr: torch.Tensor, area: torch.Tensor | None) -> Posted:
        return self._add(self.inn, _PostedRecv(peer, tag, hdr, area))

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

    def _progress(self) -> tuple[bool, set, bool]:
        """One pass: a piece of the first message to each peer, and of the message coming from
        each peer that a receive waits on, with `moving` held (a ring has one producer and one
        consumer: one thread moves at a time). Returns whether anything moved, the peers waited
        on, and whether a send waits (for room)."""
        plane = self.plane
        with self.lock:
            heads = [(q, p, q[0]) for p, q in self.out.items() if q]
            waiting = {p for p, q in self.inn.items() if q}
        moved = False
        for q, p, (op, handle) in heads:
            try:
                moved |= op.push(plane.post_tx[p], plane.files[p].addr + POST_BELL)
            except Exception as e:  # this message fails, the others go on
                op.done, error = True, e
            else:
                error = None
            if op.done:
                with self.lock:
                    q.popleft()
                handle.future.set_exception(error) if error else handle.future.set_result(None)
        for p in waiting | set(self.arriving):
            moved |= self._take(p)
        waiting |= {p for p, a in self.arriving.items() if a.receive}
        return moved, waiting | {p for _, p, _ in heads}, bool(heads)

    def _match(self, p: int, tag: int):
        """The first receive posted from peer `p` with `tag` not yet matched, taken off its queue
        (self.lock held), or None."""
        q = self.inn[p]
        for i, (recv, handle) in enumerate(q):
            if recv.tag == tag:
                del q[i]
                return recv, handle
        return None

    def _take(self, p: int) -> bool:
        """Match early messages from peer `p` to receives posted since, then move a piece of the
        message coming off its ring. Returns whether a piece moved."""
        with self.lock:
            if p in self.broken:  # the ring is past use: every receive from the peer fails
                gone = [h for _, h in self.inn[p]]
                self.inn[p].clear()
            else:
                gone = []
                for a in self.early[p]:
                    if a.receive is None:
                        a.receive = self._match(p, a.tag)
        for handle in gone:
            handle.future.set_exception(self.broken[p])
        for a in [a for a in self.early[p] if a.done and a.receive]:
            self.early[p].remove(a)
            a.deliver()
        if p in self.broken:
            return False
        a = self.arriving.get(p)
        ch = self.plane.post_rx[p]
        if a is None:
            r = ch.read()
            if ch.written() == r:
                return False
            _, tag, _, _, _, _, total = ch.preamble(r % SLOTS)
            with self.lock:
                receive = self._match(p, int(tag))
            a = self.arriving[p] = _Arrival(self.plane.rank, p, int(tag), int(total), receive)
            if receive is None:
                self.early[p].append(a)
        try:
            moved = a.pull(ch, self.plane.files[p].addr + POST_BELL)
        except Exception as e:  # a protocol error: this message fails, and every later one from the peer
            a.error, a.done, moved = e, True, True
            self.broken[p] = e
        if a.done:
            del self.arriving[p]
            if a.receive is not None:
                if a in self.early[p]:
                    self.early[p].remove(a)
                a.deliver()
        return moved

    def _loop(self) -> None:
        checked = time.monotonic()
        while not self.closed:
            bell = self.plane.mine.bell(POST_BELL)  # before looking (see ShmPlane.exchange)
            with self.moving:
                moved, waiting, sending = self._progress()
                if not moved and waiting and time.monotonic() - checked >= TICK_S:
                    checked = time.monotonic()
                    self._fail_dead(waiting)
            if moved:
                continue
            # room: see ROOM_TICK_S
            sleep(self.bell_at, bell, ROOM_TICK_S if sending else TICK_S if waiting else 1.0)

    def _fail_dead(self, peers) -> None:
        """Fail every message to or from a peer whose process has ended (`moving` held)."""
        for p in peers:
            if alive(self.plane.pids[p]):
                continue
            with self.lock:
                gone = [h for _, h in (*self.out[p], *self.inn[p])]
                self.out[p].clear()
                self.inn[p].clear()
            arrivals = {id(a): a for a in (*self.early[p], self.arriving.pop(p, None)) if a}  # (one may be both)
            gone += [a.receive[1] for a in arrivals.values() if a.receive and not a.receive[1].future.done()]
            self.early[p].clear()
            for handle in gone:
                handle.future.set_exception(PeerError(self.plane.rank, p, f"its process (pid "
                                                      f"{self.plane.pids[p]}) ended mid-message"))
