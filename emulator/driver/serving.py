"""The driver side of a serving step on the device workers (device/training/serving.py): one
prefill or decode step of a language model on every device of the system, one process per
device, or shared (driver/shared.py's replay): under balanced routing every device of a serving
layout does the same work on its own groups, so one worker records the one role and every device
is replayed from its recording, which lets a full CloudMatrix 384 (384 devices) run on one host
worker. Both give every device the same emulated figures (tests/ray/test_serving_shared.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from relay.device.training import serving as device_serving
from relay.driver import shared
from relay.driver.programs import rendezvous
from relay.errors import ConfigError
from relay.kernels import graphs


@dataclass(frozen=True)
class StepResult:
    """A serving step's emulated figures: the slowest device's, seconds; per device, its row."""

    step: device_serving.Step
    seconds: float  # the step: end - start on its slowest device
    compute_s: float  # charged op costs (the slowest device's)
    comm_s: float  # its operations (dispatch + combine), summed
    exposed_s: float  # how long its compute waited for them
    flops: float
    roles: int  # workers that recorded (shared), or devices that ran
    rows: list  # per device: its row (step_row's columns)


def check(cluster, step: device_serving.Step) -> None:
    """Refuses what a serving step on the devices cannot run, before any worker does."""
    n = cluster.system.devices
    if step.dp != n:
        raise ConfigError(f"serving step: dp = {step.dp} but the system has {n} devices; runs on the devices "
                          f"take tp = 1 and dp = devices ({n})")
    if step.ep < 1 or step.dp % step.ep:
        raise ConfigError(f"serving step: ep = {step.ep} does not divide dp = {step.dp}; choose a divisor")
    if step.micro not in (1, 2):
        raise ConfigError(f"serving step: micro = {step.micro} is invalid; give 1 (no overlap) or 2 (two "
                          "micro-batches overlapping the all-to-alls)")
    if step.drafts not in (0, 1) or (step.drafts and step.tokens != 2):
        raise ConfigError(f"serving step: drafts = {step.drafts} with tokens = {step.tokens}; a decode step "
                          "verifies at most one multi-token prediction draft: give drafts = 1 and tokens = 2")
    if cluster.clock != "virtual" or cluster.dtype != "bf16":
        raise ConfigError(f"serving step: clock = {cluster.clock!r}, dtype = {cluster.dtype!r}; runs on the "
                          "devices take the virtual clock and bf16 (fp8 and int8 serving are the analytic model's "
                          "only)")


def run(cluster, step: device_serving.Step, shared_run: bool) -> StepResult:
    """`step` on every device of the cluster's system, shared or one process per device."""
    check(cluster, step)
    job = cluster.job(1.0)
    if step.graphs:  # a captured graph's kernels: each at the graph's launch cost (kernels/graphs.py)
        job = replace(job, efficiency={**job.efficiency, "launch_us": graphs.launch_us(True)})
    if shared_run:
        plan = step.plan
        members = shared.roles(plan, skewed=False)
        reps = sorted(members)
        recs = shared.record(cluster, reps, "recording the serving step", device_serving.record, job, step)
        rows = [r[0] for r in shared.replay(cluster.system, job.fabric(), plan, dict(zip(reps, recs)), members)]
        roles = len(reps)
    else:
        if not cluster.actors:
            cluster.start()
        with rendezvous(cluster) as address:
            res = cluster.run(device_serving.run, job, step, address, what="serving step")
        rows = [r["rows"][0] for r in res]
        roles = len(rows)
    slow = max(rows, key=lambda r: r["end_s"] - r["start_s"])
    return StepResult(step, slow["end_s"] - slow["start_s"], slow["compute_s"], slow["comm_s"],
                      slow["exposed_comm_s"], slow["flops"], roles, rows)
