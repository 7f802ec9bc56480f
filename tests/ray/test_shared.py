"""Shared fake-tensor runs (driver/shared.py): one worker per distinct role records its step and
every device is replayed from it. Where one process per device also fits, the two must give
every device the same emulated figures, to the bit."""

import json

import pytest

from relay import Parallel, System
from relay.driver.shared import roles

KEYS = ("start_s", "end_s", "compute_s", "comm_s", "exposed_comm_s", "pipeline_wait_s", "flops", "spans")


def _figures(res) -> list:
    return [[{k: r[k] for k in KEYS} for r in rows] for rows in res.per_device]


@pytest.mark.parametrize("workload,text,routing,launch_us", [
    ("llama-debug", "dp=2,tp=2,pp=2,fsdp,recompute", None, None),
    ("moe-debug", "dp=4,ep=2,fsdp", "zipf:1.5", None),  # skewed: each expert group is a role of its own
    # no launch cost: the host runs ahead of the device as far as it goes, and FSDP2's gathers on
    # their own streams overlap the compute stream (relay.kernels.timeline)
    ("llama-debug", "dp=4,fsdp", None, 0.0),
])
def test_shared_run_equals_one_process_per_device(cluster8, workload, text, routing, launch_us):
    plan = Parallel.parse(text)
    cluster8.configure(System("h100", plan.devices, domain=4), clock="virtual")
    kw = dict(parallel=plan, steps=1, per_device_batch=4, tensors="fake", routing=routing)
    saved = cluster8.efficiency
    cluster8.efficiency = {} if launch_us is None else {"launch_us": launch_us}
    try:
        full = cluster8.train(workload, shared=False, **kw)
        shared = cluster8.train(workload, shared=True, **kw)
    finally:
        cluster8.efficiency = saved
    assert _figures(shared) == _figures(full)
    assert shared.steps[-1]["step_s"] > 0 and shared.steps[-1]["comm_s"] > 0
    if launch_us == 0.0:  # the gathers did overlap
        assert 0 < shared.steps[-1]["exposed_comm_s"] < shared.steps[-1]["comm_s"]
    if routing:  # the routing model's skew: the first expert takes the most tokens
        counts = shared.per_device[0][0]["routing"][0]
        assert counts[0] == max(counts) > 2 * min(counts)
    exposed = shared.per_device[0][-1]["exposed_by"]  # what the waits were for, by kind
    assert sum(exposed.values()) == pytest.approx(shared.per_device[0][-1]["exposed_comm_s"]
                                                  + shared.per_device[0][-1]["pipeline_wait_s"])


def test_roles_are_one_device_per_stage_and_skewed_expert_group():
    plan = Parallel(dp=4, ep=2, tp=2, pp=2)  # 16 devices
    balanced, skewed = roles(plan, skewed=False), roles(plan, skewed=True)
    assert sorted(balanced) == [0, 8] and sorted(len(v) for v in balanced.values()) == [8, 8]
    assert len(skewed) == 4 and sorted(d for v in skewed.values() for d in v) == list(range(16))
    for rep, devices in skewed.items():  # a role shares the stage and the expert index of its representative
        assert {(plan.coords(d)["pp"], plan.coords(d)["ep"]) for d in devices} == \
            {(plan.coords(rep)["pp"], plan.coords(rep)["ep"])}


def test_relay_run_of_fake_tensors_on_a_full_system_runs_shared(ray_session, tmp_path, capsys):
    """The command line builds its Cluster with the run's tensors, as Python's
    Cluster(..., tensors="fake") does: 256 devices (more than this host starts) run shared on one
    worker instead of being refused for want of room."""
    from relay.launch.cli import main
    assert main(["run", "--chip", "h100", "--devices", "256", "--workload", "llama-debug", "--tensors", "fake",
                 "--steps", "1", "--out", str(tmp_path), "--name", "f"]) == 0
    assert "llama-debug on 256 x h100" in capsys.readouterr().out
    training = json.loads((tmp_path / "f" / "config.json").read_text())["training"]
    assert (training["shared"], training["devices"], training["parallel"]) == (True, 256, "dp=256")
