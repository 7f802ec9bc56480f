"""The program's clock is the emulated clock (docs/design.md "Programs written for GPUs").

While a program runs on the virtual clock, `time.perf_counter`, `time.monotonic`, `time.time`
and their `_ns` forms read, on the program's thread, the device's host lane (Timeline.host: the
emulated time at which the program issues its next kernel), so a framework's own throughput and
timing lines print emulated figures. Each keeps its real value at the program's start and adds
emulated seconds from there: `time.time()` is still a date, its deltas are emulated. As on a GPU,
the host runs ahead of the streams: a timed section reads its kernels' time once the program
syncs (`torch.cuda.synchronize()`, `.item()`, an event's synchronize), as programs do.
`time.sleep(s)` on the program's thread sleeps on the host and moves the host lane on by s
emulated seconds (Timeline's "sleep" change), as a real host's time passes while it sleeps.

`relay.dist.restart_clocks()` restarts the timeline at emulated 0; the program's clock goes on
from where it was (Timeline.before_reset_s), never back.

Everything else keeps the host's time: other threads (Ray's, the communication engine's, data
loader threads), forked children (DataLoader workers: another process), and calls made from
Relay's, Ray's and torch.distributed's own modules (their timeouts and spins) even on the
program's thread; `threading` and `queue` took their clock before the patch and keep it. Other
modules imported before the program that took a clock function by name (`from time import time`:
tqdm's rates, a framework's timers) are switched to the emulated one while it runs (_taken).
`relay launch --host-clock` leaves the clock alone.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

_NAMES = ("perf_counter", "monotonic", "time")
_OWN = ("relay.", "ray.", "torch.distributed.", "grpc.")  # modules that keep the host's time
_REAL = {name: getattr(time, name) for name in _NAMES}
_REAL_NS = {name: getattr(time, name + "_ns") for name in _NAMES}
_active = None  # (thread, timeline, lane offset, {name: real value at the program's start})


def _emulated(name: str) -> float | None:
    """`name`'s emulated reading for the caller, or None where the host's applies. A module that
    took the function (`from time import perf_counter`) while a program ran keeps it: once no
    program runs, it reads the host's time again."""
    active = _active
    if active is None or threading.get_ident() != active[0]:
        return None
    if sys._getframe(2).f_globals.get("__name__", "").startswith(_OWN):
        return None
    thread, timeline, offset, start = active
    return start[name] + (timeline.host + timeline.before_reset_s - offset)


def _make(name: str):
    real = _REAL[name]

    def now() -> float:
        t = _emulated(name)
        return real() if t is None else t
    now.__name__ = now.__qualname__ = name
    return now


def _make_ns(name: str):
    real = _REAL_NS[name]

    def now_ns() -> int:
        t = _emulated(name)
        return real() if t is None else int(t * 1e9)
    now_ns.__name__ = now_ns.__qualname__ = name + "_ns"
    return now_ns


_REAL_SLEEP = time.sleep


def sleep(seconds: float) -> None:
    """time.sleep: the host's, and on the program's thread the host lane moves on by `seconds`
    too (a change the timeline records, so shared runs replay it): a program's `while monotonic()
    - t0 < timeout: sleep(dt)` loop (filelock's acquire(timeout=...)) ends as on a real host."""
    _REAL_SLEEP(seconds)
    active = _active
    if (active is not None and threading.get_ident() == active[0] and seconds > 0
            and not sys._getframe(1).f_globals.get("__name__", "").startswith(_OWN)):
        active[1].apply("sleep", float(seconds))


_PATCHED = {**{n: _make(n) for n in _NAMES}, **{n + "_ns": _make_ns(n) for n in _NAMES}, "sleep": sleep}


def _forked() -> None:
    """A forked child (a DataLoader worker, a multiprocessing pool) is another process: its thread
    has the program thread's id, but no kernel of its own advances the device's timeline, so its
    clock is the host's (else it would read a frozen emulated time: its timeouts never expire)."""
    global _active
    _active = None


os.register_at_fork(after_in_child=_forked)


@contextlib.contextmanager
def emulated(timeline):
    """While inside, the calling thread's program reads `timeline.host` as its clock."""
    global _active
    start = {name: fn() for name, fn in _REAL.items()}  # real values at this program's emulated start
    saved = {n: getattr(time, n) for n in _PATCHED}
    _active = (threading.get_ident(), timeline, timeline.host + timeline.before_reset_s, start)
    taken = []  # (module globals, name, the real function, the emulated one)
    try:
        for n, fn in _PATCHED.items():
            setattr(time, n, fn)
        for names, n in _taken():
            real = names[n]
            names[n] = _PATCHED[real.__name__]
            taken.append((names, n, real, names[n]))
        yield
    finally:
        _active = None
        for n, fn in saved.items():
            setattr(time, n, fn)
        for names, n, real, emulated_fn in taken:
            if names.get(n) is emulated_fn:  # (a name the program rebound meanwhile keeps its new value)
                names[n] = real


_REAL_BY_NAME = {**_REAL, **{n + "_ns": f for n, f in _REAL_NS.items()}, "sleep": _REAL_SLEEP}
_REAL_IDS = {id(f) for f in _REAL_BY_NAME.values()}


def _taken() -> list[tuple[dict, str]]:
    """(module globals, name) of every module imported before the program that took a clock
    function by name (`from time import time`: tqdm's rate, a framework's timers), so that it
    reads the emulated clock too; the standard library's (threading, queue, asyncio: their
    timeouts) and Relay's, Ray's and torch.distributed's own keep the host's."""
    out = []
    for name, m in list(sys.modules.items()):
        if name.partition(".")[0] in sys.stdlib_module_names or name.startswith(_OWN) or name == "__main__":
            continue
        names = getattr(m, "__dict__", None)
        if isinstance(names, dict):
            out += [(names, k) for k, v in list(names.items()) if id(v) in _REAL_IDS and callable(v)]
    return out
