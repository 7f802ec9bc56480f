"""The shared-memory files under the data plane (shm.py): one per device, its doorbell and
its inbound channels, and the futex calls that ring and sleep on doorbells.

Each device owns one file in /dev/shm holding a doorbell and one inbound channel per same-node
peer. A channel is a single-producer, single-consumer ring of SLOTS reusable slots, each with a
preamble (the message header: sender, sequence, bytes, emulated start time; then the piece's
offset and length, and the whole message's payload bytes), a `written` count (the sender's) and
a `read` count (the receiver's).

A doorbell is a futex word, incremented and woken in one atomic FUTEX_WAKE_OP syscall. A device
with nothing to do reads its doorbell, checks every channel it waits on, and sleeps on the
doorbell only if the value is unchanged, so no ring is lost (shm.py spins a while first).
Copies are memmoves on raw addresses (a torch op costs microseconds of set-up, the whole cost of
a small message).

Ordering relies on x86-64's store order (a slot's bytes become visible before the count that
publishes them), so the plane is offered on x86-64 Linux only; elsewhere gloo carries everything.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct

import torch

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
POST_BELL = 32  # byte offset of the posted messages' doorbell in a device's file
_PRE = struct.Struct("7d")  # preamble: sender, sequence (a posted message's: its tag), message bytes, start,
#                            piece offset, length, the message's payload bytes (an early message's buffer)


def unsupported() -> str | None:
    """Why this host cannot use the plane, or None when it can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"shared-memory transport needs x86-64 Linux, not {platform.system()} {platform.machine()}"
    if not os.access(SHM_DIR, os.W_OK):
        return f"{SHM_DIR} is not writable"
    return None


# ---------------------------------------------------------------- futex doorbells
_libc = ctypes.CDLL(None, use_errno=True)
memmove = ctypes.memmove
_SYS_FUTEX, _WAIT, _WAKE_OP = 202, 0, 5
_ADD_ONE = (1 << 28) | (1 << 12)  # FUTEX_OP(FUTEX_OP_ADD, 1, FUTEX_OP_CMP_EQ, 0)
_ALL = 0x7FFFFFFF


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def ring(addr: int) -> None:
    """Atomically add one to the doorbell at `addr` and wake whoever sleeps on it."""
    a = ctypes.c_void_p(addr)
    _libc.syscall(_SYS_FUTEX, a, _WAKE_OP, _ALL, 0, a, _ADD_ONE)


def sleep(addr: int, value: int, seconds: float) -> None:
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


class File:
    """One device's mapped file. Its first page: the doorbell (first word), a second doorbell for
    posted messages at +POST_BELL (mailbox.Mailbox: a thread of its own), the slot size at +64,
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
    def create(cls, path: str, senders: list[int], slot_bytes: int) -> File:
        if 80 + 8 * len(senders) > PAGE:
            raise ValueError(f"shared-memory transport: {len(senders)} channels (2 per peer) on one node is "
                             f"more than {(PAGE - 80) // 8}; use data_plane='gloo'")
        return cls(path, (sorted(senders), slot_bytes))

    @classmethod
    def open(cls, path: str) -> File:
        return cls(path)

    def channel(self, sender: int) -> Channel:
        return Channel(self, PAGE + self.senders.index(sender) * self.stride)

    def bell(self, at: int = 0) -> int:
        """The doorbell at byte `at` (0 or POST_BELL)."""
        return self.words[at // 8] & 0xFFFFFFFF

    def close(self) -> None:
        self.u8 = None
        self.words.release()
        try:
            self.mm.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with the process
            pass


class Channel:
    """One ring: `written` (the sender's count) at +0, `read` (the receiver's) at +64, the
    sender's waiting-for-room flag at +128, the slots' preambles from +192, the slots from the
    next page."""

    def __init__(self, f: File, base: int):
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

    def free(self, r: int, bell: int) -> None:
        """The receiver is done with slot count `r`: free it, and ring the sender's doorbell at
        `bell` if the sender said it waits for room."""
        self.words[self.r] = r + 1
        if self.words[self.wait]:
            self.words[self.wait] = 0
            ring(bell)

    def preamble(self, k: int) -> tuple:
        return _PRE.unpack_from(self.mm, self.base + 192 + 64 * k)

    def set_preamble(self, k: int, values: tuple) -> None:
        _PRE.pack_into(self.mm, self.base + 192 + 64 * k, *values)


def sweep() -> None:
    """Remove the files of devices that died while setting up (after it, their names are gone)."""
    for entry in os.listdir(SHM_DIR):
        if entry.startswith("relay-") and "." in entry:
            pid = entry.rsplit(".", 1)[1]
            if pid.isdigit() and not alive(int(pid)):
                try:
                    os.unlink(f"{SHM_DIR}/{entry}")
                except OSError:
                    pass
