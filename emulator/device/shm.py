"""The shared-memory data plane: messages between device workers on one node.

Each device owns one file in /dev/shm holding a doorbell and one inbound channel per same-node
peer. A channel is a single-producer, single-consumer ring of `slots` reusable slots: the sender
copies a piece of its message (at most a slot) into the next free slot, writes the piece's
preamble (the message header: sender, sequence, bytes, emulated start time; then the piece's
offset and length) and bumps the `written` count; the receiver reduces or copies the piece
straight from the slot into its buffer and bumps `read`. One copy out, one pass in, no socket.

Signalling: after publishing a piece, the sender rings the receiver's doorbell, a futex word
incremented and woken in one atomic FUTEX_WAKE_OP syscall. A device with nothing to do reads its
doorbell, checks every channel it waits on, and sleeps on the doorbell only if the value is
unchanged, so no ring is lost. The receiver rings back, when it frees a slot, only if the sender
said it waits for room (a flag in the channel): a device waiting for its peer's answer is not
woken for nothing by the peer taking its message (a context switch per message on a busy host).
Measured on this 2-core host (ping-pong between two processes): 8 us one way with no spinning, 14
us with a 100-check spin, 32 us with 1000: spinning only steals the core the peer needs, so there
is none. Copies are memmoves on raw addresses (a torch op costs microseconds of set-up, the whole
cost of a small message); reductions are torch ops on views.

Failure: a device blocked on a peer looks every TICK_S at the peer's process; a peer that died,
even mid-message, raises PeerError at once, and one that stops without dying raises it after
timeout_s without progress. The files are unlinked as soon as every device has mapped them, so
nothing is left in /dev/shm however a device ends.

Ordering relies on x86-64's store order (a slot's bytes become visible before the count that
publishes them), so the plane is offered on x86-64 Linux only; elsewhere gloo carries everything.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct
import time

import torch

from emulator.device.peers import PeerError

SHM_DIR = "/dev/shm"
SLOTS = 4  # pieces in flight per channel: the sender fills one while the receiver drains another
#           (a channel's page holds their preambles: at most 60)
SLOT_BYTES = 1 << 20  # measured: 1 MB pieces copy at 11 GB/s here, 64 KB at 6 (per-call costs),
#                       4 MB and more at 8 (they no longer fit in L2)
MIN_SLOT_BYTES = 64 << 10
BYTES_PER_DEVICE = 64 << 20  # inbound ring space per device at most: slots shrink with many peers
TICK_S = 0.05  # while blocked: how often to look at the deadline and at the peers' processes
ROOM_TICK_S = 0.002  # while blocked for room: the flag and the count it guards are written by two
#                      processes without a fence, so a ring may rarely be missed; this bounds it
PAGE = 4096
_PRE = struct.Struct("6d")  # preamble: sender, sequence, message bytes, start, piece offset, length


def unsupported() -> str | None:
    """Why this host cannot use the plane, or None when it can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"shared-memory transport needs x86-64 Linux, not {platform.system()} {platform.machine()}"
    if not os.access(SHM_DIR, os.W_OK):
        return f"{SHM_DIR} is not writable"
    return None


# ---------------------------------------------------------------- futex doorbells
_libc = ctypes.CDLL(None, use_errno=True)
_memmove = ctypes.memmove
_SYS_FUTEX, _WAIT, _WAKE_OP = 202, 0, 5
_ADD_ONE = (1 << 28) | (1 << 12)  # FUTEX_OP(FUTEX_OP_ADD, 1, FUTEX_OP_CMP_EQ, 0)
_ALL = 0x7FFFFFFF


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _ring(addr: int) -> None:
    """Atomically add one to the doorbell at `addr` and wake whoever sleeps on it."""
    a = ctypes.c_void_p(addr)
    _libc.syscall(_SYS_FUTEX, a, _WAKE_OP, _ALL, 0, a, _ADD_ONE)


def _sleep(addr: int, value: int, seconds: float) -> None:
    """Sleep until the doorbell at `addr` no longer holds `value`, a ring, or `seconds`."""
    ts = _Timespec(int(seconds), int((seconds % 1) * 1e9))
    _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _WAIT, ctypes.c_uint(value), ctypes.byref(ts), None, 0)


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


# ---------------------------------------------------------------- files and channels
def slot_bytes_for(peers: int) -> int:
    """Slot size for a device with `peers` inbound channels (whole pages, within the budget)."""
    fit = BYTES_PER_DEVICE // max(1, peers * SLOTS) // PAGE * PAGE
    return max(MIN_SLOT_BYTES, min(SLOT_BYTES, fit))


class _File:
    """One device's mapped file. Its first page: the doorbell (first word), the slot size at +64,
    the number of inbound channels at +72 and their senders from +80; then a channel per sender,
    each a page of counters and preambles followed by its slots."""

    def __init__(self, path: str, create: tuple | None = None):
        fd = os.open(path, (os.O_CREAT | os.O_EXCL | os.O_RDWR) if create else os.O_RDWR, 0o600)
        try:
            if create:
                senders, slot_bytes = create
                os.ftruncate(fd, PAGE + len(senders) * (PAGE + SLOTS * slot_bytes))  # sparse: a page
                #                                                   costs memory once it is touched
            self.mm = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        if create:
            struct.pack_into(f"QQ{len(senders)}Q", self.mm, 64, slot_bytes, len(senders), *senders)
        self.slot_bytes, count = struct.unpack_from("QQ", self.mm, 64)
        self.senders = list(struct.unpack_from(f"{count}Q", self.mm, 80))
        self.stride = PAGE + SLOTS * self.slot_bytes
        self.u8 = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.addr = self.u8.data_ptr()
        self.words = memoryview(self.mm).cast("Q")

    @classmethod
    def create(cls, path: str, senders: list[int], slot_bytes: int) -> _File:
        if 80 + 8 * len(senders) > PAGE:
            raise ValueError(f"shared-memory transport: {len(senders)} peers on one node is more than "
                             f"{(PAGE - 80) // 8}; use data_plane='gloo'")
        return cls(path, (sorted(senders), slot_bytes))

    @classmethod
    def open(cls, path: str) -> _File:
        return cls(path)

    def channel(self, sender: int) -> _Channel:
        return _Channel(self, PAGE + self.senders.index(sender) * self.stride)

    def bell(self) -> int:
        return self.words[0] & 0xFFFFFFFF

    def close(self) -> None:
        self.u8 = None
        self.words.release()
        try:
            self.mm.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with the process
            pass


class _Channel:
    """One ring: `written` (the sender's count) at +0, `read` (the receiver's) at +64, the
    sender's waiting-for-room flag at +128, the slots' preambles from +192, the slots from the
    next page."""

    def __init__(self, f: _File, base: int):
        self.mm, self.base, self.size = f.mm, base, f.slot_bytes
        self.slots = [f.u8[base + PAGE + k * self.size: base + PAGE + (k + 1) * self.size] for k in range(SLOTS)]
        self.slot_addr = [f.addr + base + PAGE + k * self.size for k in range(SLOTS)]
        # counters go through a 'Q' memoryview: one 8-byte store each (struct.pack_into zero-fills
        # before it writes, and a peer reading at that moment would see 0)
        self.words, self.w, self.r, self.wait = f.words, base // 8, base // 8 + 8, base // 8 + 16

    def written(self) -> int:
        return self.words[self.w]

    def read(self) -> int:
        return self.words[self.r]

    def set_written(self, n: int) -> None:
        self.words[self.w] = n

    def set_read(self, n: int) -> None:
        self.words[self.r] = n

    def preamble(self, k: int) -> tuple:
        return _PRE.unpack_from(self.mm, self.base + 192 + 64 * k)

    def set_preamble(self, k: int, values: tuple) -> None:
        _PRE.pack_into(self.mm, self.base + 192 + 64 * k, *values)


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

    def push(self, ch: _Channel, bell: int) -> bool:
        w = ch.written()
        if w - ch.read() >= SLOTS:
            ch.words[ch.wait] = 1  # ring me when you free a slot
            if w - ch.read() >= SLOTS:
                return False
        k, n = w % SLOTS, min(ch.size, self.total - self.off)
        for at, addr, size in _pieces(self.spans, self.off, self.off + n):
            _memmove(ch.slot_addr[k] + at, addr, size)
        ch.set_preamble(k, (*self.header, self.off, n))
        ch.set_written(w + 1)  # publishes the slot: x86 keeps the stores above in order
        _ring(bell)
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

    def pull(self, ch: _Channel, bell: int) -> bool:
        r = ch.read()
        if ch.written() == r:
            return False
        k = r % SLOTS
        sender, seq, nbytes, start, off, n = ch.preamble(k)
        if (int(sender), int(seq), int(nbytes), int(off)) != (self.peer, self.seq, self.nbytes, self.off):
            raise RuntimeError(f"device {self.me}: protocol error, expected message {self.seq} of "
                               f"{self.nbytes} bytes from device {self.peer} (at byte {self.off}), got "
                               f"message {int(seq)} of {int(nbytes)} bytes from device {int(sender)} "
                               f"(at byte {int(off)})")
        self.start = start
        n = int(n)
        for at, part in _typed_parts(self.views, self.off, self.off + n):
            size = part.numel() * part.element_size()
            if self.reduce:
                part.add_(ch.slots[k][at:at + size].view(part.dtype))
            elif part.is_contiguous():
                _memmove(part.data_ptr(), ch.slot_addr[k] + at, size)
            else:
                part.copy_(ch.slots[k][at:at + size].view(part.dtype))
        ch.set_read(r + 1)  # frees the slot once its bytes have been used
        if ch.words[ch.wait]:  # the sender waits for room: wake it
            ch.words[ch.wait] = 0
            _ring(bell)
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
        self.files: dict[int, _File] = {}
        _sweep()
        name = lambda r, pid: f"{SHM_DIR}/relay-{token}-{r}.{pid}"
        self.path = name(rank, os.getpid())
        self.mine = _File.create(self.path, list(peers), slot_bytes_for(len(peers))) if peers else None
        try:
            barrier()  # every device's file exists
            self.files = {p: _File.open(name(p, pid)) for p, pid in peers.items()}
            barrier()  # every device has mapped the files it needs: the names can go
        finally:
            self._unlink()
        self.tx = {p: f.channel(rank) for p, f in self.files.items()}  # my ring in each peer's file
        self.rx = {p: self.mine.channel(p) for p in peers}  # each peer's ring in mine

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
        last, checked = None, time.monotonic()  # last: when waiting began (None: progress just made)
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
                last = None
                continue
            now = time.monotonic()
            last = now if last is None else last
            if now - checked >= TICK_S:
                checked = now
                for p in (*inn, *out):
                    if not alive(self.pids[p]):
                        raise PeerError(self.rank, p, f"its process (pid {self.pids[p]}) ended mid-message")
            if now - last > self.timeout_s:
                p = next(iter((*inn, *out)))
                raise PeerError(self.rank, p, f"waited up to {self.timeout_s:g} s; shared memory: no "
                                              f"{'message' if p in inn else 'room'} from device {p}")
            _sleep(self.mine.addr, bell, ROOM_TICK_S if out else TICK_S)  # out: blocked for room


def _by_peer(ops) -> dict:
    out = {}
    for op in ops:
        out.setdefault(op.peer, []).append(op)
    return out


def _sweep() -> None:
    """Remove the files of devices that died while setting up (after it, their names are gone)."""
    for entry in os.listdir(SHM_DIR):
        if entry.startswith("relay-") and "." in entry:
            pid = entry.rsplit(".", 1)[1]
            if pid.isdigit() and not alive(int(pid)):
                try:
                    os.unlink(f"{SHM_DIR}/{entry}")
                except OSError:
                    pass
