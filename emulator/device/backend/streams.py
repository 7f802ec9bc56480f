"""Streams and events on the device's emulated timeline (relay.kernels.timeline).

Device-generic torch code reaches streams through its device's module: FSDP2 asks
`torch.<device type>` for `Stream`, `Event`, `stream(...)`, `current_stream()` and `synchronize()`,
and on the CPU those are no-ops (torch/cpu/__init__.py). While a program runs on a Relay device
under the virtual clock, `torch.cpu`'s are these instead: a `Stream` is a stream of the device's
Timeline, `with torch.cpu.stream(s)` puts the ops charged inside on it, `wait_stream`,
`record_event` and `wait_event` order streams on the emulated timeline, and `synchronize` joins the
host to them. So FSDP2's all-gathers (on its all-gather streams) overlap the compute stream's work
as on a GPU. Nothing is reordered on the host: ops still run in program order; only their emulated
times follow the streams.

The default stream waiting for another stream's event (FSDP2's copy-out waiting for its
all-gather) is exposed communication, as the engine counts a wait for a collective.
"""

from __future__ import annotations

import contextlib
import itertools
import time

import torch

from relay.kernels.timeline import DEFAULT

_active = None  # (Timeline, Engine) while a program runs
_ids = itertools.count(1)


def _timeline():
    if _active is None:
        raise RuntimeError("relay: an emulated stream used outside the program that made it")
    return _active[0]


def _apply(name: str, *args) -> None:
    timeline, engine = _active
    waited = timeline.apply(name, *args)
    if engine is not None:  # (None: no communication engine, a device's compute alone)
        engine.exposed_s += waited


class Stream:
    """A stream of the device's emulated timeline (torch.cpu.Stream's interface, and CUDA's)."""

    def __init__(self, priority: int = 0, *, _id: int | None = None, **kwargs) -> None:
        _timeline()
        self.id = next(_ids) if _id is None else _id
        self.priority = priority

    def wait_stream(self, stream: Stream) -> None:
        _apply("wait_stream", self.id, stream.id)

    def record_event(self, event: Event | None = None) -> Event:
        event = event or Event()
        event.record(self)
        return event

    def wait_event(self, event: Event | None) -> None:
        if event is not None:
            _apply("wait_event", self.id, event.id)

    def synchronize(self) -> None:
        _apply("sync", self.id)

    def query(self) -> bool:
        return True

    def is_capturing(self) -> bool:
        return False  # (CUDA graphs are refused: backend/cuda.py)

    def __eq__(self, other) -> bool:
        return isinstance(other, Stream) and other.id == self.id

    def __hash__(self) -> int:
        return hash(("relay-stream", self.id))

    def __repr__(self) -> str:
        return f"<relay emulated stream {self.id}>"


class Event:
    """A point on a stream of the emulated timeline."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.id = next(_ids)
        self.stream_id = None

    def record(self, stream: Stream | None = None) -> Event:
        stream = stream or current_stream()
        self.stream_id = stream.id
        _apply("record", self.id, stream.id)
        return self

    def wait(self, stream: Stream | None = None) -> None:
        (stream or current_stream()).wait_event(self)

    def synchronize(self) -> None:
        _apply("sync_event", self.id)

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: Event) -> float:
        """Emulated milliseconds from this event to `end` (both recorded)."""
        events = _timeline().events
        if self.id not in events or end.id not in events:
            raise RuntimeError("relay: elapsed_time of an event not recorded; record both events first")
        return (events[end.id] - events[self.id]) * 1e3


_DEFAULT = None  # the default stream's object, made per program


def current_stream(device=None) -> Stream:
    timeline = _timeline()
    return _DEFAULT if timeline.current == DEFAULT else Stream(_id=timeline.current)


@contextlib.contextmanager
def stream(s: Stream | None):
    if s is None:
        yield
        return
    previous = _timeline().current
    _apply("use", s.id)
    try:
        yield
    finally:
        _apply("use", previous)


def synchronize(device=None) -> None:
    _apply("sync", None)


class HostEvent:
    """torch.cuda.Event where no emulated timeline runs (`--clock wall`: the emulated time is the
    host's own, so torch.cpu's no-op streams stand): recorded at the host's time, elapsed_time in
    milliseconds of it (torch.cpu.Event takes no arguments and has no elapsed_time)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.t = None

    def record(self, stream=None) -> HostEvent:
        self.t = _host_clock()
        return self

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: HostEvent) -> float:
        if self.t is None or end.t is None:
            raise RuntimeError("relay: elapsed_time of an event not recorded; record both events first")
        return (end.t - self.t) * 1e3


class HostStream(torch.cpu.Stream):
    """torch.cuda.Stream where no emulated timeline runs: torch.cpu's no-op stream, taking CUDA's
    arguments; its record_event gives a HostEvent."""

    def __init__(self, device=None, priority: int = 0, **kwargs) -> None:
        super().__init__(priority)

    def record_event(self, event: HostEvent | None = None) -> HostEvent:
        return (event or HostEvent()).record()

    def is_capturing(self) -> bool:
        return False


_host_clock = time.perf_counter  # (taken before any program's clock patch: the host's)

_NAMES = {"Stream": Stream, "Event": Event, "current_stream": current_stream, "stream": stream,
          "synchronize": synchronize}
NAMES = tuple(_NAMES)  # what backend/cuda.py gives torch.cuda too


@contextlib.contextmanager
def emulated(timeline, engine):
    """While inside, torch.cpu's streams are `timeline`'s (see the module's docstring)."""
    global _active, _DEFAULT
    saved = {name: getattr(torch.cpu, name) for name in _NAMES}
    _active = (timeline, engine)
    _DEFAULT = Stream(_id=DEFAULT)
    for name, value in _NAMES.items():
        setattr(torch.cpu, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.cpu, name, value)
        _active = _DEFAULT = None
