"""Shared runs of launched programs: `relay launch --tensors fake --shared` and
`cluster.launch(fn, tensors="fake", shared=True)`.

A program whose every rank does the same work (data parallel, FSDP: one role) is run once, as
rank 0, on one worker alone (device/fake/launched.py: the program sees WORLD_SIZE = the system's
devices, its groups have all ranks, collectives are noted and answered locally); then every
device of the system is replayed from that recording with driver/shared.py's replay, so each
device's emulated figures (its time, compute, communication, exposed communication and its steps)
equal those of one process per device (tests/ray/test_launch_shared.py), at one device's host
time plus the replay. `plan` (`--parallel dp=,tp=,pp=`) is the hint for a program whose groups
are not the whole world: its groups must be the plan's (checked as the program makes them), and
one representative per pipeline stage records (shared.roles).

What a launch prints comes from the representative: its own output (log lines) and the values it
returned; the other devices of its role report the same values (symmetric by assumption) and no
output. Refused before anything runs: real tensors (a shared run takes no data from its peers),
the wall clock, injected faults (devices would differ).
"""

from __future__ import annotations

import sys
from dataclasses import replace

import ray

from relay.device.backend.collective import algorithms
from relay.device.backend.steps import _step_s, _with_rates
from relay.device.fake.launched import record_launched
from relay.device.fake.program import launch_fake
from relay.device.worker import RemoteWorker
from relay.driver.monitor import Failed, failure, gather
from relay.driver.session import connect_ray, release
from relay.driver.shared import DIM_NAMES, _Device, replay, roles
from relay.errors import ConfigError
from relay.parallel import Parallel


def check(cluster, program, tensors: str, plan) -> Parallel:
    """Everything a shared launch refuses, before any worker starts; returns the plan (default:
    every device one data-parallel replica)."""
    n = cluster.system.devices
    if tensors != "fake":
        raise ConfigError(f"shared = True needs tensors = 'fake' (got {tensors!r}): a shared run records one "
                          "device alone, which cannot read data from its peers; add --tensors fake")
    if cluster.clock != "virtual":
        raise ConfigError("shared = True needs the virtual clock; drop --clock wall")
    faults = cluster.faults
    if faults.compute_slowdown or faults.fail:
        raise ConfigError("shared = True replays every device from one recording: a straggler's compute or a "
                          "failing device makes devices differ; launch without --shared")
    if program.script is None and not callable(program.fn):
        raise ConfigError(f"fn = {program.fn!r} is not callable; pass the function every device runs")
    algorithms(program.algorithm)
    plan = Parallel(dp=n) if plan is None else Parallel.parse(plan)
    if plan.devices != n:
        raise ConfigError(f"parallel = {plan} covers {plan.devices} devices, the system has {n}; give a plan of "
                          f"{n} devices (dp x tp x pp = {n})")
    return plan


def launch_shared(cluster, program, on_poll=None, plan=None, tensors: str = "fake"):
    """Record each role of `program` alone, then replay every device (driver/programs.launch's
    result, with the same per-device figures)."""
    from relay.driver.programs import LaunchResult  # (programs.launch calls this module)
    plan = check(cluster, program, tensors, plan)
    connect(cluster)
    system, n = cluster.system, cluster.system.devices
    job = cluster.job(1.0)  # (the virtual clock: no pacing)
    program = ray_program(program)
    members = roles(plan, skewed=False)
    reps = sorted(members)
    world = tuple(range(n))
    workers = [RemoteWorker.options(num_cpus=0, max_concurrency=2).remote(rep, cluster.device) for rep in reps]
    try:
        allowed = [frozenset({world} | {tuple(plan.group(dim, rep)) for dim in DIM_NAMES}) for rep in reps]
        refs = [w.run.remote(record_launched, job, program, rep, ok) for w, rep, ok in zip(workers, reps, allowed)]
        recs = gather(workers, refs, cluster.timeout_s, on_poll=on_poll)
    except Failed as e:
        raise failure({reps[i]: err for i, err in e.errors.items()}, "recording the program's roles") from None
    finally:
        release(workers, [])
    recordings = {rep: {"recording": r.pop("recording"), "rows": r} for rep, r in zip(reps, recs)}
    per_device = replay(system, job.fabric(), plan, recordings, members, device_class=_Launched)
    config = {"devices": n, "system": system.describe(), "clock": cluster.clock, "dilation": job.dilation,
              "algorithms": algorithms(program.algorithm), "script": program.script, "module": program.module,
              "argv": list(program.argv), "tensors": "fake", "host_clock": program.host_clock,
              "shared": True, "roles": len(reps), "parallel": str(plan)}
    return LaunchResult(per_device, config)


def connect(cluster):
    """Ray connected (embedded if no address; the cluster then stops it on close), no device worker
    started: a shared run starts its own."""
    cluster._owns_ray = connect_ray(cluster.address) or cluster._owns_ray
    return cluster


def ray_program(program):
    """The program as the recording worker gets it: on fake tensors, its output sent back here,
    a function's module sent by value (as programs.launch sends it)."""
    name = getattr(program.fn, "__module__", None) or ""
    if name in sys.modules and name != "__main__" and not name.startswith(("relay.", "torch")):
        ray.cloudpickle.register_pickle_by_value(sys.modules[name])
    return replace(program, wrap=launch_fake, node=ray.get_runtime_context().get_node_id())


class _Launched(_Device):
    """One device of a launched program, replayed: its steps are the program's optimizer steps."""

    def _mark(self, name: str) -> None:
        if name == "step":  # as StepMarks reads them (device/backend/steps.py)
            self.marks.append({"end_s": self.comp.measure(), "exposed": self.exposed, "jobs": len(self.step_of)})

    def finish_rows(self) -> dict:
        rep = self.rows  # the representative's own result
        order = sorted(self.spans)
        spans = [s for j in order for s in self.spans[j]]
        # per step, as StepMarks sums them: the spans of the operations issued before its mark
        steps, prev = [], {"end_s": 0.0, "comm_s": 0.0, "exposed": 0.0}
        comm, seen = 0.0, 0
        for k, (m, r) in enumerate(zip(self.marks, rep["steps"])):
            new = [s for j in range(seen, m["jobs"]) for s in self.spans.get(j, ())]
            seen = m["jobs"]
            comm += sum(e - s for _, s, e, _ in new)
            row = {"device": self.d, "step": k, "end_s": m["end_s"], "step_s": _step_s(m["end_s"], prev["end_s"]),
                   "compute_s": r["compute_s"], "comm_s": comm - prev["comm_s"],
                   "exposed_comm_s": m["exposed"] - prev["exposed"], "wall_s": r["wall_s"],
                   "model_state_bytes": r["model_state_bytes"]}
            steps.append(_with_rates(row, {kind: r[kind] for kind in ("samples", "tokens")}))
            prev = {"end_s": m["end_s"], "comm_s": comm, "exposed": m["exposed"]}
        mine = self.d == rep["device"]
        return {"device": self.d, "result": rep["result"], "emulated_s": max(self.comp.measure(), self.comm.t),
                "compute_s": rep["compute_s"], "comm_s": sum(e - s for _, s, e, _ in spans),
                "exposed_comm_s": self.exposed, "flops": rep["flops"], "spans": spans, "counts": rep["counts"],
                "steps": steps, "real_s": rep["real_s"], "fidelity": 1.0, "overrun_s": 0.0,
                "output": rep["output"] if mine else None, "represented_by": rep["device"]}
