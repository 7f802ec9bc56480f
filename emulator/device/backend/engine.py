"""One device's communication engine: every operation of this device's `relay` process groups
(group.py) runs here, in issue order, on ONE background thread (collectives must run in the same
order on every member, and the transport's per-peer sequence numbers are not thread-safe).

Emulated time. An operation is stamped *ready* at the compute lane's time when it is issued; on
the communication lane it starts at max(ready, the lane's time), and its schedule runs on the
transport, pacing each message on that lane (virtual or wall clock). The compute lane moves to
the operation's end only when the program waits for it: `Work.wait()`, or the first compute op
that reads one of its outputs (`CommThrottle`), as a GPU's compute stream waits on a
communication event. So communication overlaps compute on the emulated timeline, and the time
the compute lane spends waiting is the *exposed* communication.

Point-to-point messages are posted at once (over the transport's shared-memory mailbox on a
node, its gloo group across nodes; apart from collectives' messages) and completed when they
arrive: a blocking receive on the one thread would deadlock two pipeline stages that both send
first. They are timed on persistent ports of their own; collectives use fresh ports, as the
transport's other callers do.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.utils._pytree import tree_flatten

from relay.collectives.core import Ports, prepare
from relay.collectives.fabric import Fabric
from relay.collectives.schedules import Step
from relay.device.backend import fake_values
from relay.device.backend.collective import Group, algorithms, group_of, run_collective
from relay.device.backend.loopback import Loopback
from relay.device.backend.p2p import PointToPoint, message_payload
from relay.errors import ConfigError
from relay.kernels.clock import VirtualLane

POLL_S = 1e-3  # how often the thread looks at posted point-to-point messages while any is in flight


class Work(dist.Work):
    """An operation's handle: wait() re-raises the engine's error (torch's future-based work
    drops it), then holds the compute lane until the operation's emulated end."""

    def __init__(self, engine: Engine, outputs: list):
        super().__init__()
        self.engine, self.outputs = engine, outputs
        self.event, self.error, self.end = threading.Event(), None, 0.0
        self.future = torch.futures.Future()
        self.kind = "collective"  # or "send" / "recv": a wait on a receive is counted apart (recv_wait_s)

    def wait(self, timeout=None) -> bool:
        seconds = self.engine.timeout_s if timeout is None or timeout.total_seconds() <= 0 \
            else timeout.total_seconds()
        if not self.event.wait(seconds):
            self.engine.fail(error := RuntimeError(f"relay: device {self.engine.device}: an operation did not finish "
                                                   f"within {seconds:g} s (a peer is missing or issued collectives "
                                                   "in another order)"))
            raise error
        if self.error is not None:
            raise self.error
        self.engine.forget(self.outputs)
        self.engine.waited(self)
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
        self.event.set()
        if error is None:
            self.future.set_result(self.outputs)
        else:
            self.future.set_exception(error)


class Engine(PointToPoint):
    """The device's communication lane and its one thread."""
    recording = False  # record.py's Recorder: operations are noted, not run

    def __init__(self, device: int, transport, system, fabric: Fabric, compute, comm, timeout_s: float,
                 algorithm=None):
        self.device, self.transport, self.system, self.fabric = device, transport, system, fabric
        self.compute, self.comm, self.timeout_s = compute, comm, timeout_s
        self.algorithms = algorithms(algorithm)
        self.spans: list[tuple[str, float, float, int]] = []  # (operation, start, end, bytes), emulated s
        self.exposed_s = 0.0  # emulated seconds the compute lane waited for communication
        self.recv_wait_s = 0.0  # the part of it spent in Work.wait() on receives (a pipeline's bubble, mostly)
        self._writing: dict[int, Work] = {}  # storage (_key) -> the unwaited operation that writes it
        self._p2p_ports = Ports()
        self._pending: deque = deque()  # point-to-point messages posted, in posting order
        self._waiters = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"relay-p2p-{device}")
        self._loopback = Loopback()  # messages to itself
        self.failed: BaseException | None = None  # the first operation's error: every later one fails with it
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"relay-comm-{device}", daemon=True)
        self._thread.start()

    def group(self, members) -> Group:
        return group_of(self.system, self.fabric, members, self.device)

    # ------------------------------------------------------------ issuing (program threads)
    def submit(self, run, outputs: list) -> Work:
        """Queue `run(ready)` -> emulated end; `outputs` are what the work yields (on fake tensors
        they carry no value after it: fake_values.forget)."""
        fake_values.forget(outputs)
        work = Work(self, outputs)
        self._queue(run, work)
        return work

    def p2p(self, kind: str, group: Group, tensor: torch.Tensor, peer: int, tag: int = 0) -> Work:
        """Queue a send or a receive of `tensor` to or from group rank `peer`, matched by `tag`
        (a receive takes the first message of its peer and tag not yet taken, as gloo's do)."""
        work = Work(self, [tensor] if kind == "recv" else [])
        work.kind = kind
        fake_values.forget(work.outputs)
        if peer == group.rank:  # to itself: a local copy (loopback.py)
            sent = message_payload if kind == "send" else lambda t: None  # noqa: E731
            run = lambda ready: self._loopback.post(kind, (group.members, tag), tensor, ready, work,  # noqa: E731
                                                    sent(tensor))
        else:
            post = self.send if kind == "send" else self.recv
            run = lambda ready: post(group, tensor, peer, ready, work, tag)  # noqa: E731
        self._queue(run, work)
        return work

    def _queue(self, run, work: Work) -> None:
        if self.failed is not None:  # at once, even while the thread is stuck in the failed operation
            return work._done(0.0, self._after_failure())
        self._writes(work)
        self._jobs.put((run, self.compute.scheduled(), work))

    def fail(self, error: BaseException) -> None:
        """An operation failed: every later one fails at once, naming it, not with an error of its own
        (the devices' messages no longer line up: a collective half done, a sequence number spent)."""
        self.failed = self.failed or error

    def _after_failure(self) -> RuntimeError:
        return RuntimeError(f"relay: device {self.device}: not run, because an earlier operation on this device "
                            f"failed: {type(self.failed).__name__}: {self.failed}")

    def waited(self, work: Work) -> None:
        """The program waited for `work` (Work.wait)."""
        self.consume(work.end, work.kind)

    def mark(self, name: str) -> None:
        """A point of the program's step (record.py's recorder keeps them)."""

    def consume(self, end: float, kind: str = "collective") -> None:
        """The compute lane needs a result that is ready at `end`."""
        gap = end - self.compute.scheduled()
        if gap > 0:
            if self.compute.on_default():  # a side stream's wait is not the compute's
                self.exposed_s += gap
                if kind == "recv":
                    self.recv_wait_s += gap
            self.compute.advance_to(end)

    def _writes(self, work: Work) -> None:
        for t in work.outputs:
            if isinstance(t, torch.Tensor):
                self._writing[_key(t)] = work

    def forget(self, outputs) -> None:
        for t in outputs:
            if isinstance(t, torch.Tensor):
                self._writing.pop(_key(t), None)

    def wait_for_inputs(self, args) -> None:
        """Called by the throttle before a compute op: an input that an operation not yet waited
        for writes waits for it (Work.wait), whether or not it has finished on this host, so the
        compute lane waits at the same op in every run. Registered when the operation is issued,
        on the program's thread. An AsyncCollectiveTensor (an eager functional collective's
        result) counts as the tensor it wraps."""
        if not self._writing:
            return
        for t in tree_flatten(args)[0]:
            if isinstance(t, AsyncCollectiveTensor):
                t = t.elem
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                try:
                    work = self._writing.get(_key(t))
                except RuntimeError:  # a wrapper subclass (DTensor) has no storage of its own
                    continue
                if work is not None:
                    work.wait()

    def drain(self) -> None:
        """Wait for everything issued so far (at the end of a program)."""
        self.submit(lambda ready: self.comm.scheduled(), []).event.wait(self.timeout_s)
        while self._pending:
            threading.Event().wait(POLL_S)

    def restart(self) -> None:
        restart(self)

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
                if self.failed is not None:
                    raise self._after_failure()
                with torch.no_grad():  # outputs may be leaves that require grad (parameters)
                    end = run(ready)
            except BaseException as e:  # surfaces in the program, from Work.wait()
                self.fail(e)
                work._done(self.comm.scheduled(), e)
                continue
            if end is not None:  # None: a point-to-point message, completed by _reap
                work._done(end)
            # not kept while the thread waits for the next operation: this one's buffers (its
            # output among them) are freed with the program's last reference, as on a GPU
            job = run = work = None

    def _post(self, works: list, finish, work: Work) -> None:
        """A posted message: a waiter thread sees its handles through (gloo's point-to-point
        works cannot be polled), then this thread finishes it, in posting order."""
        timeout = self.transport.timeout
        arrived = self._waiters.submit(lambda: [w.wait(timeout) for w in works])
        self._pending.append((arrived, finish, work))

    def _reap(self) -> None:
        while self._pending and self._pending[0][0].done():
            arrived, finish, work = self._pending.popleft()
            try:
                arrived.result()
                work._done(finish())
            except BaseException as e:
                self.fail(e)
                work._done(0.0, e)

    # ------------------------------------------------------------ running (the thread only)
    def collective(self, group: Group, primitive: str, buf: torch.Tensor, count: int, ready: float,
                   op: str = "sum", algorithm: str | None = None, **options) -> float:
        """`primitive` among `group` on the flat CPU buffer `buf`, with this run's algorithm for
        it (unless given), on the communication lane. Returns the emulated end."""
        start, end = run_collective(self.transport, group, primitive, algorithm or self.algorithms[primitive], buf,
                                    count, self.comm, ready, op, **options)
        self.spans.append((primitive, start, end, buf.numel() * buf.element_size()))
        return end

    def steps(self, group: Group, name: str, steps: list[Step], buf: torch.Tensor, ready: float) -> float:
        """Any schedule of `group` (gather and scatter are built by the caller)."""
        self.comm.advance_to(ready)
        start = self.comm.now()
        fabric = group.fabric.with_(elem_bytes=buf.element_size())
        self.transport.run(steps, buf, self.comm, Ports(), fabric, ranks=group.ranks)
        end = self.comm.now()
        self.spans.append((name, start, end, buf.numel() * buf.element_size()))
        return end

    def exchange(self, group: Group, row: list[int], column=None) -> list[list[int]]:
        """Every member's `row` (all-to-all splits), as control traffic outside emulated time
        (`column`, what this member receives from each, is not needed here: see record.py)."""
        buf = prepare("all_gather", group.rank, group.size, torch.tensor(row, dtype=torch.int64))
        self.transport.control("all_gather", buf, group.size, ranks=list(group.members))
        return buf.view(group.size, -1).tolist()


def _key(t: torch.Tensor) -> int:
    """A tensor's storage, as the engine tracks what communication wrote (fake tensors share
    data pointer 0, so the storage object's identity, not its address)."""
    return t.untyped_storage()._cdata


def restart(engine: Engine) -> None:
    """relay.dist.restart_clocks(): every device's lanes back to emulated 0, together."""
    if not isinstance(engine.comm, VirtualLane):
        raise ConfigError("restart_clocks() needs clock = 'virtual' (a wall clock cannot go back)")
    engine.drain()
    everyone = engine.group(range(engine.system.devices))

    def run(ready):
        engine.exchange(everyone, [0] * everyone.size)  # a barrier, outside emulated time
        engine.comm.reset()
        engine.compute.reset()
        engine._writing.clear()
        engine._p2p_ports = Ports()
        return 0.0
    engine.submit(run, []).wait()
