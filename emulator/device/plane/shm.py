"""The shared-memory data plane: messages between device workers on one node, through the
files, channels and doorbells of shm_file.py.

The sender copies a piece of its message (at most a slot) into the next free slot of its channel
in the receiver's file, writes the piece's preamble and bumps the `written` count, then rings the
receiver's doorbell; the receiver checks the preamble against what its schedule expects, reduces
or copies the piece straight from the slot into its buffer and bumps `read`. One copy out, one
pass in, no socket. The receiver rings back, when it frees a slot, only if the sender said it
waits for room (a flag in the channel): a device waiting for its peer's answer is not woken for
nothing by the peer taking its message (a context switch per message on a busy host).
Reductions are torch ops on views of the slot.

Failure: a device blocked on a peer looks every TICK_S at the peer's process; a peer that died,
even mid-message, raises PeerError at once, and one that stops without dying raises it after
timeout_s without progress. The files are unlinked as soon as every device has mapped them, so
nothing is left in /dev/shm however a device ends.
"""

from __future__ import annotations

import os
import time

from relay.device.plane import shm_file
from relay.device.plane.peers import PeerError
from relay.device.plane.shm_file import ROOM_TICK_S, SLOTS, TICK_S, Channel, File, alive, memmove, ring, sleep

SPIN_S = 250e-6  # how long a device waiting for a peer spins before it sleeps: on this 2-core VM host
#   a futex sleep and wake-up cost about 45 us of CPU; a 4-byte ping-pong between actors took
#   110-150 us one way without spinning, 37-50 us with a 100 us spin (a 1 MB piece's copy, under
#   memory contention, often outlasted it) and 28-31 us with this one. A spin that fails (the
#   message came only after a sleep) halves the next one, so oversubscribed devices, whose peers
#   are not running, soon stop spinning; one wait in PROBE_EVERY spins in full to see if it pays
PROBE_EVERY = 16
POSTED = 1 << 32  # channel id POSTED + p: peer p's posted point-to-point messages (the backend's send/recv)

# what the plane's users read from the layer below
SHM_DIR, slot_bytes_for, unsupported = shm_file.SHM_DIR, shm_file.slot_bytes_for, shm_file.unsupported


def _pieces(spans, off: int, end: int):
    """(at, address, bytes) for the parts of byte range [off, end) of a message laid over `spans`,
    a list of (message offset, address, bytes): they go to byte `at` of the piece."""
    for start, addr, size in spans:
        lo, hi = max(off, start), min(end, start + size)
        if lo < hi:
            yield lo - off, addr + lo - start, hi - lo


# ---------------------------------------------------------------- one message each way
class SendOp:
    """One message to a peer: header (sender, sequence, emulated bytes, emulated start) and the
    payload, spans of the sender's buffer (message offset, address, bytes), streamed through the
    ring a slot at a time."""

    def __init__(self, peer: int, header: tuple, spans: list):
        self.peer, self.header, self.spans = peer, header, spans
        self.total = sum(size for _, _, size in spans)
        self.off, self.done = 0, False

    def push(self, ch: Channel, bell: int) -> bool:
        w = ch.written()
        if w - ch.read() >= SLOTS:
            ch.words[ch.wait] = 1  # ring me when you free a slot
            if w - ch.read() >= SLOTS:
                return False
        k, n = w % SLOTS, min(ch.size, self.total - self.off)
        for at, addr, size in _pieces(self.spans, self.off, self.off + n):
            memmove(ch.slot_addr[k] + at, addr, size)
        ch.set_preamble(k, (*self.header, self.off, n, self.total))
        ch.set_written(w + 1)  # publishes the slot: x86 keeps the stores above in order
        ring(bell)
        self.off += n
        self.done = self.off >= self.total
        return True


class RecvOp:
    """One message from a peer, checked against what this device's schedule expects (sender,
    sequence, emulated bytes) and reduced or copied piece by piece into `views`, a list of
    (message offset, typed tensor) (the buffer's segments, or a staging area)."""

    def __init__(self, me: int, peer: int, seq: int, nbytes: int, views: list, reduce: bool):
        self.me, self.peer, self.seq, self.nbytes = me, peer, seq, nbytes
        self.views, self.reduce = views, reduce
        self.total = sum(v.numel() * v.element_size() for _, v in views)
        self.off, self.done, self.start = 0, False, None

    def pull(self, ch: Channel, bell: int) -> bool:
        r = ch.read()
        if ch.written() == r:
            return False
        k = r % SLOTS
        sender, seq, nbytes, start, off, n, _ = ch.preamble(k)
        if (int(sender), int(seq), int(nbytes), int(off)) != (self.peer, self.seq, self.nbytes, self.off):
            raise _mismatch(self.me, (self.peer, self.seq, self.nbytes, self.off), (sender, seq, nbytes, off))
        self.start = start
        n = int(n)
        for at, part in _typed_parts(self.views, self.off, self.off + n):
            size = part.numel() * part.element_size()
            if self.reduce:
                part.add_(ch.slots[k][at:at + size].view(part.dtype))
            elif part.is_contiguous():
                memmove(part.data_ptr(), ch.slot_addr[k] + at, size)
            else:
                part.copy_(ch.slots[k][at:at + size].view(part.dtype))
        ch.free(r, bell)  # once its bytes have been used
        self.off += n
        self.done = self.off >= self.total
        return True


def _typed_parts(views, off: int, end: int):
    for start, v in views:
        e = v.element_size()
        lo, hi = max(off, start), min(end, start + v.numel() * e)
        if lo < hi:
            yield lo - off, v[(lo - start) // e:(hi - start) // e]


# ---------------------------------------------------------------- the plane
class ShmPlane:
    """This device's channels to its same-node peers ({peer: pid}). Every device of the process
    group builds one at the same time (the set-up meets twice at `barrier`), even with no peers."""

    def __init__(self, rank: int, peers: dict[int, int], token: str, timeout_s: float, barrier):
        self.rank, self.pids, self.timeout_s = rank, dict(peers), timeout_s
        self._checked = 0.0  # when the peers' processes were last looked at
        self._spin_s, self._waits = SPIN_S, 0  # how long quick's next receive spins; how many waited
        self.files: dict[int, File] = {}
        shm_file.sweep()
        name = lambda r, pid: f"{SHM_DIR}/relay-{token}-{r}.{pid}"
        self.path = name(rank, os.getpid())
        senders = [*peers, *(POSTED + p for p in peers)]  # each peer's rings: schedules', posted messages'
        self.mine = File.create(self.path, senders, slot_bytes_for(len(senders))) if peers else None
        try:
            barrier()  # every device's file exists
            self.files = {p: File.open(name(p, pid)) for p, pid in peers.items()}
            barrier()  # every device has mapped the files it needs: the names can go
        finally:
            self._unlink()
        self.tx = {p: f.channel(rank) for p, f in self.files.items()}  # my ring in each peer's file
        self.rx = {p: self.mine.channel(p) for p in peers}  # each peer's ring in mine
        # the rings of posted point-to-point messages (mailbox.Mailbox), apart: never in a schedule's way
        self.post_tx = {p: f.channel(POSTED + rank) for p, f in self.files.items()}
        self.post_rx = {p: self.mine.channel(POSTED + p) for p in peers}

    def _unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self._unlink()
        self.tx, self.rx = {}, {}
        for f in [*self.files.values(), self.mine]:
            if f is not None:
                f.close()
        self.files, self.mine = {}, None

    def exchange(self, sends: list[SendOp], recvs: list[RecvOp]) -> None:
        """Move these messages (to and from peers of this plane) until all have been sent and
        received. Messages on one channel go in list order; channels progress side by side, a
        piece at a time, so that no large message waits for another."""
        out, inn = _by_peer(sends), _by_peer(recvs)
        since = spin_end = None  # when waiting began and its spin ends (None: progress just made)
        while out or inn:
            bell = self.mine.bell()  # before looking: a ring after this wakes the sleep below
            moved = False
            for p, q in list(out.items()):
                moved |= q[0].push(self.tx[p], self.files[p].addr)
                if q[0].done:
                    q.pop(0) if len(q) > 1 else out.pop(p)
            for p, q in list(inn.items()):
                moved |= q[0].pull(self.rx[p], self.files[p].addr)
                if q[0].done:
                    q.pop(0) if len(q) > 1 else inn.pop(p)
            if moved:
                if spin_end is not None and since is None:
                    self._spin_s = SPIN_S  # the spin paid off
                since = spin_end = None
                continue
            if spin_end is None:
                spin_end = time.perf_counter() + self._spin_for()
            if since is None and time.perf_counter() < spin_end:
                continue
            if since is None:
                self._spin_s /= 2  # the spin did not pay off
            since = self._idle(bell, since, inn, out)

    def quick(self, out: tuple | None, inn: tuple | None):
        """exchange's fast path for at most one message each way that fits in a slot (a ring's
        step, a small point-to-point message), with no objects made per message: the host time of
        a small message is these few lines. `out`: (peer, header, address, bytes); `inn`: (peer,
        sequence, emulated bytes, payload bytes, into), `into` the address the payload is copied
        to, or a contiguous tensor it is added into. Returns the incoming message's emulated start
        (None without one), or False, having moved nothing, when the ring to `out`'s peer is full
        (exchange then moves both)."""
        if out is not None:
            peer, header, addr, n = out
            ch = self.tx[peer]
            w = ch.words[ch.w]
            if w - ch.words[ch.r] >= SLOTS:
                return False
            k = w % SLOTS
            if n:
                memmove(ch.slot_addr[k], addr, n)
            ch.set_preamble(k, (*header, 0, n, n))
            ch.words[ch.w] = w + 1  # publishes the slot (see SendOp.push)
            ring(self.files[peer].addr)
        if inn is None:
            return None
        peer, seq, nbytes, size, into = inn
        ch, since = self.rx[peer], None
        words, w, r = ch.words, ch.w, ch.words[ch.r]
        if words[w] == r:  # not there yet: spin a while, then sleep (see SPIN_S)
            end = time.perf_counter() + self._spin_for()
            while words[w] == r and time.perf_counter() < end:
                pass
            if words[w] == r:
                while True:
                    bell = self.mine.bell()
                    if words[w] != r:
                        break
                    since = self._idle(bell, since, (peer,), ())
                self._spin_s /= 2
            else:
                self._spin_s = SPIN_S
        k = r % SLOTS
        sender, sq, nb, start, off, n, _ = ch.preamble(k)
        if (int(sender), int(sq), int(nb), int(off), int(n)) != (peer, seq, nbytes, 0, size):
            raise _mismatch(self.rank, (peer, seq, nbytes, 0), (sender, sq, nb, off))
        if size:
            if isinstance(into, int):
                memmove(into, ch.slot_addr[k], size)
            else:
                into.add_(ch.slots[k][:size].view(into.dtype))
        ch.free(r, self.files[peer].addr)
        return start

    def _spin_for(self) -> float:
        """How long a wait that begins now spins before it sleeps (see SPIN_S)."""
        self._waits += 1
        return SPIN_S if self._waits % PROBE_EVERY == 0 else self._spin_s

    def _idle(self, bell: int, since: float | None, inn, out) -> float:
        """Nothing moved: fail if a peer waited on (`inn`: for a message, `out`: for room) has
        died or the deadline has passed, else sleep until a ring. Returns when waiting began."""
        now = time.monotonic()
        since = now if since is None else since
        if now - max(since, self._checked) >= TICK_S:
            self._checked = now
            for p in (*inn, *out):
                if not alive(self.pids[p]):
                    raise PeerError(self.rank, p, f"its process (pid {self.pids[p]}) ended mid-message")
        if now - since > self.timeout_s:
            p = next(iter((*inn, *out)))
            raise PeerError(self.rank, p, f"waited up to {self.timeout_s:g} s; shared memory: no "
                                          f"{'message' if p in inn else 'room'} from device {p}")
        sleep(self.mine.addr, bell, ROOM_TICK_S if out else TICK_S)  # out: blocked for room
        return since


def _mismatch(me: int, expected: tuple, got: tuple) -> RuntimeError:
    """The error for a piece other than the one expected (sender, sequence, bytes, offset each)."""
    p, seq, nbytes, off = expected
    sender, sq, nb, at = (int(v) for v in got)
    return RuntimeError(f"device {me}: protocol error, expected message {seq} of {nbytes} bytes from device "
                        f"{p} (at byte {off}), got message {sq} of {nb} bytes from device {sender} (at byte {at})")


def _by_peer(ops) -> dict:
    out = {}
    for op in ops:
        out.setdefault(op.peer, []).append(op)
    return out
