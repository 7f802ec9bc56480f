"""Shared fake-tensor runs: a full system's training step from one worker per distinct role.

`roles` picks the representatives: one device per pipeline stage (and per expert-parallel index
when routing is skewed, since expert groups then see different token counts); every other device
of a role does the same work, on its own groups. Each representative records its step on a worker
of its own (device/fake/record.py), then `replay` times every device of the system from its role's
recording with the engine's arithmetic: the compute lane charged op by op (VirtualLane), each
operation started on the device's communication lane at max(ready, the lane's time) in issue
order, a collective timed by the local executor from its members' start times (the distributed
executor's arithmetic, collectives/core.py), point-to-point messages on persistent ports of their
own, and the compute lane held at each wait until the operation's end. So its figures equal those
of one process per device, to the bit (tests/ray/test_shared.py checks it where both fit), except
that a collective of more than EXACT_UP_TO devices that all start at the same time is timed once
per shape from 0 and shifted (equal within rounding: 3.5 s of host time saved per 384-device ring).
A collective is timed once per (shape, members' start times): the groups of one dimension (every
expert group, say) usually run the same collective from the same starts, and get the same ends.
The replay is driven by events: a device runs until it cannot go on, then sleeps until a
collective it is in completes or a message reaches it (the order devices run in changes no time);
each group resolves each of its collectives (algorithm, protocol, the shape above) once; and a
ring's timing is the local executor's vectorised lockstep path (collectives/local.py), equal to
its loop to the bit.
Each row also says what its exposed communication waited for (`exposed_by`: tensor parallel,
pipeline, expert all-to-all, data parallel).
"""

from __future__ import annotations

import functools
from collections import defaultdict, deque
from dataclasses import replace

from relay.collectives.core import Ports, time_recv, time_sends
from relay.collectives.local import execute
from relay.collectives.schedules import Recv, Send, Step
from relay.device.backend.collective import group_of, resolved
from relay.device.training import parallel as device_plans
from relay.device.training.parallel import step_row
from relay.device.worker import RemoteWorker
from relay.driver.monitor import Failed, failure, gather
from relay.driver.session import release
from relay.errors import ConfigError
from relay.kernels.clock import VirtualLane
from relay.kernels.timeline import Timeline
from relay.parallel import DIMS

DIM_NAMES = (*DIMS, "dp")


def roles(plan, skewed: bool) -> dict[int, list[int]]:
    """Representative device -> the devices of its role."""
    out = defaultdict(list)
    for d in range(plan.devices):
        c = plan.coords(d)
        rep = {**c, "dp_outer": 0, "tp": 0, "ep": c["ep"] if skewed else 0}
        out[_device(plan, rep)].append(d)
    return dict(out)


def _group(plan, dim: str, d: int) -> tuple:
    """plan.group(dim, d), from every group of the dimension found once (_groups)."""
    return _groups(plan, dim)[d]


@functools.lru_cache(maxsize=64)
def _groups(plan, dim: str) -> dict[int, tuple]:
    """Device -> its group along `dim`: plan.group looks at every device of the plan, so it is
    asked once per group, not once per device."""
    out: dict[int, tuple] = {}
    for d in range(plan.devices):
        if d not in out:
            group = tuple(plan.group(dim, d))
            out.update(dict.fromkeys(group, group))
    return out


def _device(plan, coords: dict) -> int:
    d = 0
    for name, size in zip(DIMS, plan.shape):
        d = d * size + coords[name]
    return d


class _Device:
    """One device's replay: its role's recording, on its own groups."""

    def __init__(self, d: int, recording: dict, rows: list, rename, category):
        self.d, self.events, self.rows, self.rename, self.category = d, recording["events"], rows, rename, category
        self.jobs = recording["jobs"]
        self.at = 0  # next event
        self.comp, self.comm, self.ports = Timeline(recording["launch_s"]), VirtualLane(), Ports()
        self.queue: deque = deque()  # (job, ready) issued, not yet run on the communication lane
        self.part = 0  # the next part of the queue's first job
        self.job_end: dict[int, float] = {}
        self.recvs: deque = deque()  # (job, ready, part) posted receives, in posting order
        self.seq: dict = defaultdict(int)  # group -> collectives this device has started on it
        self.started: dict = {}  # (group, seq) of the collective it waits in, and its start
        self.spans: dict[int, list] = defaultdict(list)  # job -> (name, start, end, bytes)
        self.step_of: dict[int, int] = {}
        self.exposed = self.recv_wait = 0.0
        self.exposed_by: dict = defaultdict(float)  # what the compute lane waited for: see _category
        self.marks: list = []  # per step: [start, backward, end, exposed, recv_wait] at each mark
        self.out: list = []

    def run_compute(self) -> bool:
        """Events until a wait that cannot be met yet; True if any ran."""
        moved = False
        while self.at < len(self.events):
            kind, arg = self.events[self.at]
            if kind == "seg":
                self.comp.charge_all(arg)
            elif kind == "issue":
                self.queue.append((arg, self.comp.scheduled()))
                self.step_of[arg] = len(self.marks) - 1
            elif kind == "wait":
                if arg not in self.job_end:
                    return moved
                gap = self.job_end[arg] - self.comp.scheduled()
                if gap > 0:
                    if self.comp.on_default():  # (as Engine.consume counts it)
                        self.exposed += gap
                        self.exposed_by[self.category(self.jobs[arg])] += gap
                        if self.jobs[arg]["kind"] == "recv":
                            self.recv_wait += gap
                    self.comp.advance_to(self.job_end[arg])
            elif kind == "timeline":
                gap = self.comp.apply(arg[0], *arg[1])
                if gap > 0:  # the compute stream waited for a side stream (FSDP2's: the plans' only maker of them)
                    self.exposed += gap
                    self.exposed_by["data parallel"] += gap
            elif kind == "mark":
                self._mark(arg)
            self.at += 1
            moved = True
        return moved

    def _mark(self, name: str) -> None:
        # read as the device reads them (parallel._steps): the device's time, the current stream's
        if name == "start":
            self.marks.append({"start": self.comp.measure(), "exposed": self.exposed, "recv_wait": self.recv_wait,
                               "by": dict(self.exposed_by)})
        elif name == "backward":
            self.marks[-1]["backward"] = self.comp.scheduled()
        elif name == "end":
            self.marks[-1].update(end=self.comp.measure(), exposed_end=self.exposed, recv_wait_end=self.recv_wait,
                                  by_end=dict(self.exposed_by))

    def finish_rows(self) -> list:
        out = []
        for step, (m, rec) in enumerate(zip(self.marks, self.rows)):
            spans = [s for j, k in sorted(self.step_of.items()) if k == step for s in self.spans[j]]
            wait = m["recv_wait_end"] - m["recv_wait"]
            row = step_row(step, (m["start"], m["backward"], m["backward"], m["end"]), spans, rec["compute_s"],
                           rec["flops"], (m["exposed_end"] - m["exposed"]) - wait, wait)
            row.update({k: rec[k] for k in ("loss", "local_loss", "routing", "wall_s")})
            row["exposed_by"] = {k: v - m["by"].get(k, 0.0) for k, v in m["by_end"].items()}
            out.append(row)
        return out


def replay(system, fabric, plan, recordings: dict[int, dict], members: dict[int, list[int]],
           device_class=_Device) -> list[list[dict]]:
    """Every device's rows from its role's recording (recordings: representative -> the record
    worker's result, members: representative -> its role's devices; device_class: launched
    programs' rows, driver/launch_shared.py)."""
    n = system.devices
    groups: dict = {}

    def group(ms: tuple, d: int):
        key = (ms, d)
        if key not in groups:
            groups[key] = group_of(system, fabric, ms, d)
        return groups[key]

    devices = []
    for rep, devs in members.items():
        dims = {tuple(plan.group(dim, rep)): dim for dim in DIM_NAMES}
        dims[tuple(range(n))] = "world"
        rec = recordings[rep]

        def category(job, dims=dims):
            """What a wait was for: the step breakdown's parts."""
            if job["kind"] != "collective":
                return "pipeline"
            if not job["parts"]:
                return "other"
            part = job["parts"][0]
            if part[2] == "all_to_all":
                return "expert all-to-all"
            return {"tp": "tensor parallel", "pp": "pipeline"}.get(dims.get(tuple(part[1])), "data parallel")

        for d in devs:
            def rename(ms, d=d, dims=dims, rep=rep, seen={}):  # seen: this device's renames
                if ms not in seen:
                    dim = dims.get(tuple(ms))
                    if len(ms) > 1 and dim is None:
                        raise ConfigError(f"shared run: device {rep} used a group {list(ms)} that is none of the "
                                          "plan's; run one process per device")
                    seen[ms] = (d,) if len(ms) == 1 else tuple(range(n)) if dim == "world" else _group(plan, dim, d)
                return seen[ms]
            devices.append(device_class(d, rec["recording"], rec["rows"], rename, category))
    by_index = {x.d: x for x in devices}
    waiting: dict = defaultdict(dict)  # (group, seq) -> {device: start}
    mail: dict = defaultdict(deque)  # (sender, receiver) -> emulated starts of the messages sent
    timed: dict = {}  # a collective's inputs -> its members' ends (_collective)
    shapes: dict = {}  # (group, a collective's part) -> its group, resolved algorithm, fabric, options, shape

    def run_comm(x: _Device) -> bool:
        moved = False
        while x.queue:
            job, ready = x.queue[0]
            parts = x.jobs[job]["parts"]
            if x.part < len(parts):
                part = parts[x.part]
                kind, ms = part[0], x.rename(part[1])
                if kind == "collective":
                    key = (ms, x.seq[ms])
                    if key not in x.started:
                        x.started[key] = max(ready, x.comm.t)  # the lane: advance_to(ready), then now()
                        waiting[key][x.d] = x.started[key]
                        moved = True
                    if len(waiting[key]) < len(ms):
                        return moved
                    # every member's part done
                    _collective(key, part, ms, waiting.pop(key), by_index, group, timed, shapes)
                    for m in ms:
                        wake(m)
                    moved = True
                    continue
                if kind == "send":
                    wake(_send(x, job, ready, part, ms, group, mail))
                else:
                    x.recvs.append((job, ready, part, ms))
                x.part += 1
                moved = True
                continue
            if x.jobs[job]["kind"] == "collective":
                x.job_end[job] = x.spans[job][-1][2] if x.spans[job] else ready
            x.queue.popleft()
            x.part = 0
            moved = True
        return moved

    # event-driven: a device runs until it cannot move, then sleeps until a collective it is in
    # completes or a message reaches it (the order devices run in does not change any time)
    ready, queued = deque(devices), {x.d for x in devices}

    def wake(d: int) -> None:
        if d not in queued:  # (the device running now is in it: it goes on while it moves)
            queued.add(d)
            ready.append(by_index[d])

    while ready:
        x = ready.popleft()
        moved = True
        while moved:
            moved = x.run_compute()
            moved |= run_comm(x)
            while x.recvs and mail[(x.recvs[0][3][x.recvs[0][2][2]], x.d)]:
                job, ready_s, part, ms = x.recvs.popleft()
                _recv(x, job, ready_s, part, ms, group, mail)
                moved = True
        queued.discard(x.d)
    stuck = [x.d for x in devices if x.at < len(x.events) or x.queue or x.recvs][:8]
    if stuck:
        raise RuntimeError(f"shared run: the replay cannot go on (devices {stuck} wait forever); the roles' "
                           "recordings do not match: run one process per device")
    return [by_index[d].finish_rows() for d in range(n)]


EXACT_UP_TO = 64  # devices: larger collectives whose members start together are timed once per shape


def _collective(key, part, ms, starts: dict, by_index, group, timed: dict, shapes: dict) -> None:
    _, _, primitive, algorithm, count, elem, nbytes, options, nbuf = part
    if (ms, part[2:]) not in shapes:  # a group repeats its few collectives (each layer's): resolved once
        g = group(ms, ms[0])
        alg, fab, opts = resolved(g, primitive, algorithm, count, elem, nbytes, options)
        shape = (primitive, alg, g.size, count, g.topology, *_links(fab), repr(sorted(opts.items())))  # execute's
        shapes[ms, part[2:]] = g, alg, fab, opts, shape
    g, alg, fab, opts, shape = shapes[ms, part[2:]]
    t = tuple(starts[m] for m in ms)
    if len(ms) > EXACT_UP_TO and min(t) == max(t):
        # the local executor costs O(devices x steps) in Python (3.5 s for a ring all-gather of 384
        # devices): timed once from 0 and shifted, equal to the exact timing within rounding
        if shape not in timed:
            timed[shape] = execute(primitive, alg, g.size, count, g.topology, fab, **opts)
        ends = [t[0] + x for x in timed[shape]]
    else:
        # exact: the same schedule from the same start times ends at the same times, and the groups
        # of a dimension (e.g. every expert group) run the same collective from the same starts
        if (shape, t) not in timed:
            timed[shape, t] = execute(primitive, alg, g.size, count, g.topology, fab, start_times=t, **opts)
        ends = timed[shape, t]
    for m, end in zip(ms, ends):
        y = by_index[m]
        job = y.queue[0][0]
        y.spans[job].append((primitive, starts[m], end, nbuf))
        y.comm.advance_to(end)
        y.seq[ms] += 1
        y.part += 1
        del y.started[key]


def _links(fab) -> tuple:
    """A group's fabric as its timing sees it: the members enter only through link(), by which
    ranks share a domain and by their stragglers' factors, so groups alike in both time alike."""
    if not fab.members:
        return fab, ()
    slow, seen = dict(fab.slowdown), {}
    return replace(fab, members=(), slowdown=()), tuple((seen.setdefault(m // fab.member_domain, len(seen)),
                                                          slow.get(m, 1.0)) for m in fab.members)


def _send(x, job, ready, part, ms, group, mail) -> int:
    """Posts a message; returns its receiver."""
    _, _, peer, numel, elem = part
    g = group(ms, x.d)
    fabric = g.fabric.with_(elem_bytes=elem)
    step = Step(sends=(Send(peer, ((0, numel),)),))
    starts, done = time_sends(g.rank, step, max(ready, x.comm.t), x.ports, fabric)
    mail[(x.d, ms[peer])].append(starts[0])
    x.spans[job].append(("send", starts[0], done, numel * elem))
    x.job_end[job] = done
    return ms[peer]


def _recv(x, job, ready, part, ms, group, mail) -> None:
    _, _, peer, numel, elem = part
    g = group(ms, x.d)
    start = mail[(ms[peer], x.d)].popleft()
    arrival = time_recv(g.rank, Recv(peer, ((0, numel),), False), start, x.ports, g.fabric.with_(elem_bytes=elem))
    x.spans[job].append(("recv", start, arrival, numel * elem))
    x.job_end[job] = max(ready, arrival)


def run(cluster, job, config) -> list[dict]:
    """A shared run of `config` on the cluster's system (driver/training.py): record, then replay.
    Each role records in a worker process of its own, started for it and ended after: torch keeps
    state across programs in one process (DTensor's meshes of two runs compare equal while
    holding different groups), and a representative is another device than any worker was."""
    plan = config.parallel
    skewed = config.routing is not None and getattr(config.routing, "s", None) != 0
    members = roles(plan, skewed)
    reps = sorted(members)
    recs = record(cluster, reps, "recording the roles", device_plans.record, job, config)
    rows = replay(cluster.system, job.fabric(), plan, {r: x for r, x in zip(reps, recs)}, members)
    return [{"device": d, "rows": r, "state_dict": {}, "fidelity": 1.0, "overrun_s": 0.0, "roles": len(reps)}
            for d, r in enumerate(rows)]


def record(cluster, reps: list, what: str, fn, *args) -> list:
    """Each representative's recording, fn(worker, *args, rep), on a worker process of its own,
    started for it and ended after; a failure names the representative device."""
    workers = [RemoteWorker.options(num_cpus=0, max_concurrency=2).remote(rep, cluster.device) for rep in reps]
    try:
        return gather(workers, [w.run.remote(fn, *args, rep) for w, rep in zip(workers, reps)], cluster.timeout_s)
    except Failed as e:
        raise failure({reps[i]: err for i, err in e.errors.items()}, what) from None
    finally:
        release(workers, [])
