"""The device as CUDA runs it, on the virtual clock: a host lane that issues kernels onto streams.

The host (the program's Python thread) pays each kernel's launch and goes on; the kernel runs on
its stream once the stream is free: an op starts at max(its issue time, its stream's time, the
events its stream waits on). So the host runs ahead of the device, and work on a side stream
(FSDP2's all-gathers, issued while the compute stream still runs the layer before) overlaps the
compute stream's work, as on a GPU.

    host        the emulated time the program has issued up to (`host`)
    stream s    the emulated time stream s's queued work ends (`streams[s]`); 0 is the default
                (compute) stream, the one a program runs on unless it selects another
    event e     a stream's time when the event was recorded (`events[e]`)

A kernel of cost c on stream s is issued at the host's time, starts at max(that, streams[s]) and
ends c later; issuing it costs the host min(launch, c) (its cost already holds the launch). On
one stream the host is never ahead of the stream (it pays at most what the stream does), so the
stream's time is the sum of the costs, to the bit, as a single compute lane's. The host's lead
is bounded as a GPU's launch queue bounds it: a kernel cannot be issued before the one
`queue_depth` kernels earlier on its stream has started.

Host-blocking calls (`.item()`, `synchronize`) join the host to the stream(s) they wait for.
What the engine reads as "the compute lane" (`scheduled`, `now`, `advance_to`) is the *current*
stream: an operation is ready at the current stream's time when issued (NCCL's stream waits on
the current stream), and Work.wait() holds the current stream, not the host. `measure` is the
device's time: max(host, every stream), read without joining anything.

Every change other than a kernel goes through `apply(name, *args)` (and is handed to `listener`,
if set, so record.py can note it and driver/shared.py replay it on a Timeline of its own).
"""

from __future__ import annotations

from collections import defaultdict, deque

DEFAULT = 0  # the default (compute) stream
QUEUE_DEPTH = 1024  # kernels a stream holds issued and not started (CUDA's launch queue: an estimate)


class Timeline:
    kind = "virtual"

    def __init__(self, launch_s: float, queue_depth: int = QUEUE_DEPTH):
        self.launch_s = launch_s  # host time to issue one kernel, emulated s
        self.host = 0.0
        self.streams: dict[int, float] = defaultdict(float)
        self.streams[DEFAULT] = 0.0
        self.current = DEFAULT
        self.events: dict[int, float] = {}
        self.starts: dict[int, deque] = defaultdict(lambda: deque(maxlen=queue_depth))
        self.charged_s = 0.0
        self.waited_s = 0.0  # emulated s the default stream waited for other streams' events
        self.before_reset_s = 0.0  # the device's time at each reset, summed (the program's clock runs on)
        self.listener = None  # called as listener(name, args) on every change but a kernel

    # ------------------------------------------------------------ kernels (the throttle)
    def charge(self, cost: float) -> None:
        s, host = self.current, self.host
        starts = self.starts[s]
        if len(starts) == starts.maxlen and starts[0] > host:
            host = starts[0]  # the launch queue is full: the host waits for its oldest kernel
        end = self.streams[s]
        start = end if end >= host else host
        self.streams[s] = start + cost
        starts.append(start)
        self.host = host + min(self.launch_s, cost)
        self.charged_s += cost

    def charge_all(self, costs) -> None:
        for c in costs:
            self.charge(c)

    # ------------------------------------------------------------ the current stream, as a lane
    def scheduled(self) -> float:
        return self.streams[self.current]

    def now(self) -> float:
        return self.streams[self.current]

    def advance_to(self, t: float) -> None:
        """The current stream waits until t (a Work.wait(), an op reading a collective's output)."""
        if t > self.streams[self.current]:
            self.streams[self.current] = t

    def on_default(self) -> bool:
        return self.current == DEFAULT

    def measure(self) -> float:
        """The device's emulated time: every stream's work and the host, nothing joined."""
        return max(self.host, max(self.streams.values()))

    def start(self) -> None:
        pass

    def reset(self) -> None:
        """Everything back to emulated 0 (relay.dist.restart_clocks)."""
        self.apply("reset")

    def _reset(self) -> float:
        self.before_reset_s += self.measure()  # (clock.py: the program's clock never goes back)
        self.host = 0.0  # (the current stream stays: the program may be inside a stream's block)
        for s in self.streams:
            self.streams[s] = 0.0
        self.events.clear()
        self.starts.clear()
        return 0.0

    def stats(self) -> dict:
        return {"emulated_s": self.measure(), "charged_s": self.charged_s, "overrun_s": 0.0,
                "overruns": 0, "fidelity": 1.0}

    # ------------------------------------------------------------ streams, events, host syncs
    def apply(self, name: str, *args) -> float:
        """One change by name (so a recording can replay it): returns the time the default stream
        waited, if it did (else 0)."""
        if self.listener is not None:
            self.listener(name, args)
        return getattr(self, "_" + name)(*args)

    def _use(self, stream: int) -> float:
        self.current = stream
        return 0.0

    def _wait_stream(self, stream: int, other: int) -> float:
        return self._wait(stream, self.streams[other])

    def _record(self, event: int, stream: int) -> float:
        self.events[event] = self.streams[stream]
        return 0.0

    def _wait_event(self, stream: int, event: int) -> float:
        # an event never recorded is complete (CUDA's): nothing to wait for
        return self._wait(stream, self.events.get(event, 0.0))

    def _sync(self, stream: int | None) -> float:
        """The host waits for a stream (None: every stream)."""
        t = max(self.streams.values()) if stream is None else self.streams[stream]
        self.host = max(self.host, t)
        return 0.0

    def _sleep(self, seconds: float) -> float:
        """The program's host slept (time.sleep on its thread: backend/clock.py): the host lane
        moves on by that long, as a real host's time passes; the streams do not."""
        self.host += seconds
        return 0.0

    def _sync_event(self, event: int) -> float:
        self.host = max(self.host, self.events.get(event, 0.0))
        return 0.0

    def _wait(self, stream: int, t: float) -> float:
        gap = t - self.streams[stream]
        if gap <= 0:
            return 0.0
        self.streams[stream] = t
        if stream == DEFAULT:
            self.waited_s += gap
            return gap
        return 0.0

    def host_sync(self) -> None:
        """A host-blocking op on the current stream (`.item()`, a data-dependent shape)."""
        self.apply("sync", self.current)
