"""The program's clock is the emulated clock (docs/design.md "Programs written for GPUs").

While a program runs on the virtual clock, `time.perf_counter`, `time.monotonic`, `time.time`
and their `_ns` forms read, on the program's thread, the device's host lane (Timeline.host: the
emulated time at which the program issues its next kernel), so a framework's own throughput and
timing lines print emulated figures. Each keeps its real value at the program's start and adds
emulated seconds from there: `time.time()` is still a date, its deltas are emulated. As on a GPU,
the host runs ahead of the streams: a timed section reads its kernels' time once the program
syncs (`torch.cuda.synchronize()`, `.item()`, an event's synchronize), as programs do.

Everything else keeps the host's time: other threads (Ray's, the communication engine's, data
loader threads), and calls made from Relay's, Ray's and torch.distributed's own modules (their
timeouts and spins) even on the program's thread; `threading` and `queue` took their clock
before the patch. `relay launch --host-clock` leaves the clock alone.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

_NAMES = ("perf_counter", "monotonic", "time")
_OWN = ("relay.", "ray.", "torch.distributed.", "grpc.")  # modules that keep the host's time


@contextlib.contextmanager
def emulated(timeline):
    """While inside, the calling thread's program reads `timeline.host` as its clock."""
    real = {name: getattr(time, name) for name in _NAMES}
    real_ns = {name: getattr(time, name + "_ns") for name in _NAMES}
    start = {name: fn() for name, fn in real.items()}  # real values at emulated 0 of this program
    offset = timeline.host  # the lane may already have run (cluster.launch's set-up)
    thread = threading.get_ident()

    def theirs() -> bool:
        if threading.get_ident() != thread:
            return True
        caller = sys._getframe(2).f_globals.get("__name__", "")
        return caller.startswith(_OWN)

    def make(name):
        fn, base = real[name], start[name]

        def now() -> float:
            return fn() if theirs() else base + (timeline.host - offset)
        now.__name__ = name
        return now

    def make_ns(name):
        fn, base = real_ns[name], int(start[name] * 1e9)

        def now_ns() -> int:
            return fn() if theirs() else base + int((timeline.host - offset) * 1e9)
        now_ns.__name__ = name + "_ns"
        return now_ns

    patched = {**{n: make(n) for n in _NAMES}, **{n + "_ns": make_ns(n) for n in _NAMES}}
    saved = {n: getattr(time, n) for n in patched}
    for n, fn in patched.items():
        setattr(time, n, fn)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(time, n, fn)
