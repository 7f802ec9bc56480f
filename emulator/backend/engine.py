"""One device's communication engine: every operation of this device's `relay` process groups
runs here, in issue order, on ONE background thread (collectives must be issued in the same order
on every member, and the transport's per-peer sequence numbers are not thread-safe).

Emulated time. An operation is stamped *ready* at the compute lane's time when it is issued; on
the communication lane it starts at max(ready, the lane's time), and its schedule runs on the
transport, pacing each message on that lane (virtual or wall clock). The compute lane moves to
the operation's end only when the program waits for it: `Work.wait()`, or the first compute op
that reads one of its outputs (`Throttle` below), as a GPU's compute stream waits on a
communication event. So communication overlaps compute on the emulated timeline, and the time
the compute lane spends waiting is the *exposed* communication.

Point-to-point messages are posted at once and completed when they arrive (a blocking receive
on the one thread would deadlock two stages that both send first), on persistent ports of their
own; collectives use fresh ports, as the transport's other callers do.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from collections import deque
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten

from emulator.collectives import pipeline_chunks
from emulator.collectives.core import Ports, prepare, time_recv, time_sends
from emulator.collectives.schedules import Recv, Send, Step, Topology, algorithms_for, check, schedule
from kernels.clock import VirtualLane
from kernels.throttle import Throttle

DEFAULT_ALGORITHMS = {"all_reduce": "ring", "reduce_scatter": "ring", "all_gather": "ring",
                      "broadcast": "ring", "all_to_all": "direct"}
POLL_S = 1e-3  # how often the thread looks at posted point-to-point messages while any is in flight


def algorithms(choice=None) -> dict:
    """Per primitive, the algorithm: None (the defaults), one name for every primitive it
    implements, or a dict {primitive: algorithm}."""
    out = dict(DEFAULT_ALGORITHMS)
    if isinstance(choice, str):
        out.update({p: choice for p in out if choice in algorithms_for(p)})
        check("all_reduce", choice)  # an unknown name is refused
    elif choice:
        for p, a in dict(choice).items():
            check(p, a)
            out[p] = a
    return out


@dataclass(frozen=True)
class Group:
    """A process group as the engine sees it: group rank i is device members[i]."""
    members: tuple[int, ...]
    rank: int  # this device's group rank
    system: object  # the group's own System: its size, and its scale-up domains if regular
    regular: bool  # members fill equal scale-up domains, domain by domain (hierarchical applies)
    link_of: object = field(repr=False)  # (group rank, group rank) -> (class, Link)

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def topology(self) -> Topology:
        return Topology(self.size, self.system.domain)


def group_of(system, links, members, device: int) -> Group:
    """The members' places in `system`: a group inside one scale-up domain runs on its links."""
    members = tuple(members)
    doms = [system.domain_of(m) for m in members]
    runs = [1]
    for a, b in zip(doms, doms[1:]):
        runs[-1:] = [runs[-1] + 1] if a == b else [runs[-1], 1]
    regular = len(set(runs)) == 1 and len(runs) == len(set(doms))
    chips = tuple(system.chip_of(m) for m in members) if system.device_chips else ()
    sub = replace(system, devices=len(members), domain=runs[0] if regular else len(members), device_chips=chips)
    return Group(members, members.index(device), sub, regular,
                 lambda i, j: links(members[i], members[j]))


def run_steps(transport, group: Group, steps: list[Step], buf: torch.Tensor, lane, link_of, op: str = "sum",
              elem_bytes: int | None = None) -> None:
    """THE one call of Transport.run on a device (adapt here when its signature changes)."""
    transport.run(steps, buf, lane, Ports(), link_of, elem_bytes or buf.element_size(),
                  ranks=list(group.members), op=op)


def run_collective(transport, group: Group, primitive: str, algorithm: str, buf: torch.Tensor, count: int,
                   lane, ready: float, op: str = "sum", elem_bytes: int | None = None,
                   **options) -> tuple[float, float]:
    """One collective of `group` on `buf` (flat, CPU), paced on `lane` from `ready`: the code
    path of every collective a device runs, the backend's and the trainer's. Returns the
    emulated (start, end). `elem_bytes`: the emulated size of an element (default: the real)."""
    if algorithm == "hierarchical" and not group.regular:  # no two levels to use
        algorithm = "direct" if primitive == "all_to_all" else "ring"
    elem = elem_bytes or buf.element_size()
    options.setdefault("chunks", pipeline_chunks(primitive, algorithm, count * elem, group.system))
    steps = schedule(primitive, algorithm, group.rank, group.size, count, group.topology, **options)
    lane.advance_to(ready)
    start = lane.now()
    run_steps(transport, group, steps, buf, lane, group.link_of, op, elem)
    return start, lane.now()


class Work(dist.Work):
    """An operation's handle: wait() re-raises the engine's error (torch's future-based work
    drops it), then holds the compute lane until the operation's emulated end."""

    def __init__(self, engine: "Engine", outputs: list):
        super().__init__()
        self.engine, self.outputs = engine, outputs
        self.event, self.error, self.end = threading.Event(), None, 0.0
        self.future = torch.futures.Future()

    def wait(self, timeout=None) -> bool:
        seconds = self.engine.timeout_s if timeout is None or timeout.total_seconds() <= 0 \
            else timeout.total_seconds()
        if not self.event.wait(seconds):
            raise RuntimeError(f"relay: device {self.engine.device}: an operation did not finish within "
                               f"{seconds:g} s (a peer is missing or issued collectives in another order)")
        if self.error is not None:
            raise self.error
        self.engine.consume(self.end)
        return True

    def is_completed(self) -> bool:
        return self.event.is_set()

    def is_success(self) -> bool:
        return self.event.is_set() and self.error is None

    def exception(self):
        return self.error

    def result(self) -> list:
        return self.outputs

    def get_future(self):
        return self.future

    def synchronize(self) -> None:
        self.wait()

    def _done(self, end: float, error=None) -> None:
        self.end, self.error = end, error
        if error is None:
            self.engine.produced(self.outputs, end)
        self.event.set()
        if error is None:
            self.future.set_result(self.outputs)
        else:
            self.future.set_exception(error)


class Engine:
    """The device's communication lane and its one thread."""

    def __init__(self, device: int, transport, system, links, compute, comm, timeout_s: float,
                 algorithm=None):
        self.device, self.transport, self.system, self.links = device, transport, system, links
        self.compute, self.comm, self.timeout_s = compute, comm, timeout_s
        self.algorithms = algorithms(algorithm)
        self.spans: list[tuple[str, float, float, int]] = []  # (operation, start, end, bytes), emulated s
        self.exposed_s = 0.0  # emulated seconds the compute lane waited for communication
        self._ready_at: dict[int, float] = {}  # storage address -> emulated end of the op that wrote it
        self._p2p_ports = Ports()
        self._pending: deque = deque()  # point-to-point messages posted, in posting order
        self._waiters = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"relay-p2p-{device}")
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"relay-comm-{device}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ issuing (program threads)
    def submit(self, run, outputs: list) -> Work:
        """Queue `run(ready)` -> emulated end; `outputs` are what the work yields."""
        work = Work(self, outputs)
        self._jobs.put((run, self.compute.scheduled(), work))
        return work

    def p2p(self, kind: str, group: Group, tensor: torch.Tensor, peer: int) -> Work:
        """Queue a send or a receive of `tensor` to or from group rank `peer`."""
        work = Work(self, [tensor] if kind == "recv" else [])
        post = self.send if kind == "send" else self.recv
        self._jobs.put((lambda ready: post(group, tensor, peer, ready, work), self.compute.scheduled(), work))
        return work

    def consume(self, end: float) -> None:
        """The compute lane needs a result that is ready at `end`."""
        gap = end - self.compute.scheduled()
        if gap > 0:
            self.exposed_s += gap
            self.compute.advance_to(end)

    def produced(self, tensors, end: float) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._ready_at[t.untyped_storage().data_ptr()] = end

    def wait_for_inputs(self, args) -> None:
        """Called by the throttle before a compute op: hold it until communication that wrote
        its inputs has ended (then forget those entries)."""
        if not self._ready_at:
            return
        for t in tree_flatten(args)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                try:
                    ptr = t.untyped_storage().data_ptr()
                except RuntimeError:  # a wrapper subclass (DTensor) has no storage of its own
                    continue
                end = self._ready_at.pop(ptr, None)
                if end is not None:
                    self.consume(end)

    def drain(self) -> None:
        """Wait for everything issued so far (at the end of a program)."""
        self.submit(lambda ready: self.comm.scheduled(), []).event.wait(self.timeout_s)
        while self._pending:
            threading.Event().wait(POLL_S)

    def restart(self) -> None:
        """emulator.dist.restart_clocks(): every device's lanes back to emulated 0, together."""
        if not isinstance(self.comm, VirtualLane):
            raise ValueError("restart_clocks() needs clock = 'virtual' (a wall clock cannot go back)")
        self.drain()
        everyone = group_of(self.system, self.links, range(self.system.devices), self.device)

        def run(ready):
            self.exchange(everyone, [0] * everyone.size)  # a barrier, outside emulated time
            self.compute.t = self.comm.t = 0.0
            self._ready_at.clear()
            self._p2p_ports = Ports()
            return 0.0
        self.submit(run, []).wait()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=self.timeout_s)
        self._waiters.shutdown(wait=False)

    # ------------------------------------------------------------ the thread
    def _loop(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=POLL_S if self._pending else None)
            except queue.Empty:
                job = ()
            self._reap()
            if job is None:
                return
            if not job:
                continue
            run, ready, work = job
            try:
                with torch.no_grad():  # outputs may be leaves that require grad (parameters)
                    end = run(ready)
            except BaseException as e:  # surfaces in the program, from Work.wait()
                work._done(self.comm.scheduled(), e)
                continue
            if end is not None:  # None: a point-to-point message, completed by _reap
                work._done(end)

    def _post(self, works: list, finish, work: Work) -> None:
        """A posted message: a waiter thread sees its gloo works through (gloo's point-to-point
        works cannot be polled), then this thread finishes it, in posting order."""
        arrived = self._waiters.submit(lambda: [w.wait(self.transport.timeout) for w in works])
        self._pending.append((arrived, finish, work))

    def _reap(self) -> None:
        while self._pending and self._pending[0][0].done():
            arrived, finish, work = self._pending.popleft()
            try:
                arrived.result()
                work._done(finish())
            except BaseException as e:
                work._done(0.0, e)

    # ------------------------------------------------------------ running (the thread only)
    def collective(self, group: Group, primitive: str, buf: torch.Tensor, count: int, ready: float,
                   op: str = "sum", **options) -> float:
        """`primitive` among `group` on the flat CPU buffer `buf`, with this run's algorithm for
        it, on the communication lane. Returns the emulated end."""
        start, end = run_collective(self.transport, group, primitive, self.algorithms[primitive], buf, count,
                                    self.comm, ready, op, **options)
        self.spans.append((primitive, start, end, buf.numel() * buf.element_size()))
        return end

    def steps(self, group: Group, name: str, steps: list[Step], buf: torch.Tensor, ready: float,
              op: str = "sum") -> float:
        """Any schedule of `group` (gather and scatter are built by the caller)."""
        self.comm.advance_to(ready)
        start = self.comm.now()
        run_steps(self.transport, group, steps, buf, self.comm, group.link_of, op)
        end = self.comm.now()
        self.spans.append((name, start, end, buf.numel() * buf.element_size()))
        return end

    def exchange(self, group: Group, row: list[int]) -> list[list[int]]:
        """Every member's `row` (all-to-all splits), as control traffic outside emulated time."""
        buf = prepare("all_gather", group.rank, group.size, torch.tensor(row, dtype=torch.int64))
        steps = schedule("all_gather", "ring", group.rank, group.size, buf.numel(), group.topology)
        run_steps(self.transport, group, steps, buf, VirtualLane(), lambda i, j: ("up", _INSTANT), "sum")
        return buf.view(group.size, group.size).tolist()

    def send(self, group: Group, tensor: torch.Tensor, peer: int, ready: float, work: Work) -> None:
        """Post one message to group rank `peer` (header and payload, as the transport sends)."""
        tr, dev = self.transport, group.members[peer]
        payload = tensor.detach().reshape(-1).contiguous().clone()
        step = Step(sends=(Send(peer, ((0, payload.numel()),)),))
        ready = max(ready, self.comm.scheduled())
        starts, done = time_sends(group.rank, step, ready, self._p2p_ports, group.link_of, payload.element_size())
        seq = tr.sent[dev]
        tr.sent[dev] += 1
        hdr = torch.tensor([group.rank, seq, payload.numel() * payload.element_size(), starts[0]],
                           dtype=torch.float64)
        works = [tr.pg.send([hdr], dev, tr._tag(seq, 0))]
        if payload.numel():
            works.append(tr.pg.send([payload], dev, tr._tag(seq, 1)))
        self.spans.append(("send", starts[0], done, payload.numel() * payload.element_size()))
        self._post(works, lambda keep=(hdr, payload): done, work)  # keep: alive until sent

    def recv(self, group: Group, tensor: torch.Tensor, peer: int, ready: float, work: Work) -> None:
        tr, dev = self.transport, group.members[peer]
        area = torch.empty(tensor.numel(), dtype=tensor.dtype)
        seq = tr.got[dev]
        tr.got[dev] += 1
        hdr = torch.empty(4, dtype=torch.float64)
        works = [tr.pg.recv([hdr], dev, tr._tag(seq, 0))]
        if area.numel():
            works.append(tr.pg.recv([area], dev, tr._tag(seq, 1)))
        nbytes = area.numel() * area.element_size()

        def finish() -> float:
            sender, hseq, got, start = hdr.tolist()
            if (int(sender), int(hseq), int(got)) != (peer, seq, nbytes):
                raise RuntimeError(f"relay: device {self.device}: protocol error, expected message {seq} of "
                                   f"{nbytes} bytes from group rank {peer}, got message {int(hseq)} of "
                                   f"{int(got)} bytes from group rank {int(sender)} (send and recv sizes differ?)")
            arrival = time_recv(group.rank, Recv(peer, ((0, area.numel()),), False), start,
                                self._p2p_ports, group.link_of, area.element_size())
            with torch.no_grad():
                tensor.copy_(area.view_as(tensor))
            self.spans.append(("recv", start, arrival, nbytes))
            return max(ready, arrival)
        self._post(works, finish, work)


class _Instant:  # a link that takes no time, for control traffic
    latency_s, Bps = 0.0, float("inf")


_INSTANT = _Instant()


class CommThrottle(Throttle):
    """The device's throttle, made to wait for communication whose results an op reads."""

    def __init__(self, engine: Engine, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.engine = engine

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.engine.wait_for_inputs((args, kwargs))
        return super().__torch_dispatch__(func, types, args, kwargs)
