"""Shared fake-tensor runs: one worker per distinct role records its devices' step, and the driver
(driver/shared.py) times every device of the system from the recordings.

Devices that do identical work need not each cost a process: under a plan on fake tensors, the
devices of one pipeline stage (and, with skewed routing, of one expert group) charge the same ops
and issue the same operations on their own groups, whatever their data-parallel replica or
tensor-parallel rank. One worker plays a representative of each such role, alone (its own
store: no peer), with the `Recorder` for engine: each operation the program issues is noted (its
group, primitive, algorithm, sizes), finished at once, and never sent; the compute lane's charges
are kept op by op, and every wait and step mark in between. What the program reads of its peers
on fake tensors is decided as the plan's devices would decide it together: an all-to-all's split
matrix is made from this device's row and column as devices that route alike make it (every
device routes as many tokens by the same routing model: Recorder.exchange), and a one-element
value received (the pipeline's start-up vote) is 1.

A recording is a list of events, in program order:
    ("seg", costs)   compute charges (emulated s), one per op, on the current stream
    ("issue", job)   an operation is issued (its ready time: the current stream's, then)
    ("wait", job)    the program waits for it (Work.wait, or an op reading its output)
    ("mark", name)   a point of the step: start, backward (its end), end
    ("timeline", (name, args))  a change of the device's Timeline other than a kernel (a stream
                     selected, waited on or recorded, a host sync: relay.kernels.timeline)
and `jobs[job]`: the operation's kind ("collective", "send", "recv") and its parts, each a
collective `("collective", members, primitive, algorithm, count, elem, nbytes, options, bytes)`
or a message `("send" | "recv", members, peer, numel, elem)`.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor

from relay.device.backend.engine import Engine, Work
from relay.errors import ConfigError
from relay.kernels.timeline import Timeline


class Recorder(Engine):
    """An engine that notes what the program issues (see the module's docstring)."""

    recording = True

    def __init__(self, device, transport, system, fabric, compute, comm, timeout_s, algorithm=None):
        super().__init__(device, transport, system, fabric, compute, comm, timeout_s, algorithm)
        self.events: list = []
        self.jobs: dict[int, dict] = {}
        self._costs: list = []
        compute.charge = self._charge  # the throttle charges through the lane: every op's cost, kept
        compute.charge_all = self._charge_all
        compute.listener = lambda name, args: self._event("timeline", (name, args))  # streams, host syncs

    def _charge(self, cost: float) -> None:
        self._costs.append(cost)
        Timeline.charge(self.compute, cost)

    def _charge_all(self, costs) -> None:
        for c in costs:
            self._charge(c)

    def _event(self, *event) -> None:
        if self._costs:
            self.events.append(("seg", self._costs))
            self._costs = []
        self.events.append(event)

    # ------------------------------------------------------------ the program's thread
    def submit(self, run, outputs: list) -> Work:
        work = Work(self, outputs)
        self._issue(work, "collective", run)
        return work

    def p2p(self, kind: str, group, tensor: torch.Tensor, peer: int, tag: int = 0) -> Work:
        work = Work(self, [tensor] if kind == "recv" else [])
        work.kind = kind
        post = self.send if kind == "send" else self.recv
        self._issue(work, kind, lambda ready: post(group, tensor, peer, ready, work))
        return work

    def _issue(self, work: Work, kind: str, run) -> None:
        work.job = len(self.jobs)
        self.jobs[work.job] = {"kind": kind, "parts": []}
        self._event("issue", work.job)
        self._writes(work)
        self._jobs.put((run, self.compute.scheduled(), work))

    def waited(self, work: Work) -> None:
        self._event("wait", work.job)

    def mark(self, name: str) -> None:
        self._event("mark", name)

    def drain(self) -> None:
        """Every job noted (not an operation of the program's)."""
        done = Work(self, [])
        done.job = None
        self._jobs.put((lambda ready: 0.0, 0.0, done))
        done.event.wait(self.timeout_s)

    def recording_of(self) -> dict:
        self._event("mark", "finish")
        return {"events": self.events, "jobs": self.jobs, "launch_s": self.compute.launch_s}

    # ------------------------------------------------------------ the engine's thread
    def collective(self, group, primitive, buf, count, ready, op="sum", algorithm=None, **options) -> float:
        nbytes = options.pop("nbytes", None)
        options = tuple(sorted((k, _frozen(v)) for k, v in options.items()))
        part = ("collective", group.members, primitive, algorithm or self.algorithms[primitive], count,
                buf.element_size(), nbytes, options, buf.numel() * buf.element_size())
        return self._note(part)

    def send(self, group, tensor, peer, ready, work) -> float:
        return self._note(("send", group.members, peer, tensor.numel(), tensor.element_size()))

    def recv(self, group, tensor, peer, ready, work) -> float:
        if isinstance(tensor, FakeTensor) and tensor.numel() <= 1:
            tensor.constant = torch.ones(tensor.shape, dtype=tensor.dtype)
        return self._note(("recv", group.members, peer, tensor.numel(), tensor.element_size()))

    def steps(self, group, name, steps, buf, ready) -> float:
        raise ConfigError(f"{name} is not supported in shared runs (record.py); run one process per device")

    def exchange(self, group, row: list[int], column=None) -> list[list[int]]:
        """The split matrix as devices that route alike make it: a dispatch (this device receives
        as much from every peer) sends every row like this one; a return trip (it sends as much to
        every peer) has each sender send alike, what this device receives from it; a rotation
        (inference.balanced_splits) has each sender's row this one's turned by the sender's rank."""
        column = list(column if column is not None else row)
        if len(set(column)) == 1:
            return [list(row)] * group.size
        if len(set(row)) == 1:
            return [[c] * group.size for c in column]
        n, me = group.size, group.rank
        f = [row[(k + me) % n] for k in range(n)]  # a rotation: each sender's row is this one's turned by
        if column == [f[(me - i) % n] for i in range(n)]:  # its rank (balanced rows that n does not divide)
            return [[f[(p - i) % n] for p in range(n)] for i in range(n)]
        raise ConfigError(f"shared run: an all-to-all on devices {list(group.members)} whose sizes differ by sender "
                          "and by receiver; run one process per device (shared=False)")

    def _note(self, part: tuple) -> float:
        self.jobs[self._running]["parts"].append(part)
        return 0.0

    def _loop(self) -> None:  # as Engine's, knowing which job runs
        while True:
            job = self._jobs.get()
            if job is None:
                return
            run, ready, work = job
            self._running = work.job
            try:
                with torch.no_grad():
                    end = run(ready)
            except BaseException as e:
                work._done(0.0, e)
                continue
            work._done(end if end is not None else 0.0)
            job = run = work = None  # (as Engine._loop: not kept until the next operation)


def _frozen(v):
    """An option as a hashable value (split matrices are lists of lists)."""
    return tuple(_frozen(x) for x in v) if isinstance(v, (list, tuple)) else v
