"""Data-parallel training on the device actors."""

import runpy

import pytest
import torch
from torch import nn

from relay import System, Workload, train_single
from relay.collectives import ALGORITHMS
from relay.driver.metrics import STEP_COLUMNS
from relay.hardware.chips import Chip
from relay.hardware.chips import get as get_chip
from relay.workloads import get, shard

# fp32 all the way; N-device training sums gradients in another order than one process does
ATOL = {"mlp": 1e-5, "gpt-tiny": 1e-4}


def system_for(n):
    return System("h100", n, domain=2 if n % 2 == 0 and n > 2 else n)


@pytest.mark.parametrize("name", ["mlp", "gpt-tiny"])
@pytest.mark.parametrize("n", [2, 4])
def test_n_devices_equal_one_process_on_the_global_batch(cluster, name, n):
    cluster.configure(system_for(n), clock="virtual")
    ref_losses, ref_weights = train_single(get(name), steps=3, global_batch=4 * n, seed=7)
    for algorithm in ALGORITHMS:
        res = cluster.train(name, steps=3, per_device_batch=4, algorithm=algorithm, seed=7)
        assert res.losses == pytest.approx(ref_losses, abs=ATOL[name]), algorithm
        for k, v in ref_weights.items():
            torch.testing.assert_close(res.state_dict[k], v, atol=ATOL[name], rtol=0, msg=f"{algorithm}: {k}")


def test_loss_falls_for_mlp(cluster):
    res = cluster.train("mlp", steps=40, per_device_batch=8)
    assert res.losses[-1] < 0.3 * res.losses[0]


def test_gpt_tiny_reaches_its_entropy_floor(cluster):
    """The language's entropy rate is the best loss any model can reach; 60 steps of 2 x 16
    sequences get within 0.15 nats of it (single-process runs of this size land at 0.06-0.1)."""
    cluster.configure(System("h100", 2))
    res = cluster.train("gpt-tiny", steps=60, per_device_batch=16)
    floor = get("gpt-tiny").loss_floor
    assert 2.0 < floor < 3.0
    assert res.losses[0] > floor + 1.0
    assert min(res.losses[-5:]) < floor + 0.15


def test_virtual_clock_is_deterministic(cluster):
    a = cluster.train("gpt-tiny", steps=3, per_device_batch=2, seed=3)
    b = cluster.train("gpt-tiny", steps=3, per_device_batch=2, seed=3)
    assert a.losses == b.losses
    assert [s["step_s"] for s in a.steps] == [s["step_s"] for s in b.steps]
    emulated = lambda res: [[{k: v for k, v in r.items() if k != "wall_s"} for r in d] for d in res.per_device]  # noqa: E731
    assert emulated(a) == emulated(b)


@pytest.mark.parametrize("name, bucket_mb, overlap", [("gpt-tiny", 0.05, True), ("mlp", 0.002, True),
                                                     ("gpt-tiny", 0.05, False)])
def test_replayed_steps_give_the_emulated_times_of_per_op_charging(cluster, name, bucket_mb, overlap):
    """Replay (kernels/replay.py) against charging every op: the same emulated figures on every
    device and step, to the bit, including when each gradient bucket became ready and each
    all-reduce's span; slow links and small buckets, so that readiness decides the overlap."""
    cluster.configure(System("h100", 2, scaleup_gbps=2), clock="virtual")
    kw = dict(steps=5, per_device_batch=4, bucket_mb=bucket_mb, seed=1, overlap=overlap)
    per_op = cluster.train(name, replay=False, **kw)
    fast = cluster.train(name, **kw)
    assert all(r["charged"] == "per-op" for d in per_op.per_device for r in d)
    assert [r["charged"] for r in fast.per_device[0]] == ["record", "record", "replay", "replay", "replay"]
    emulated = lambda res: [[{k: v for k, v in r.items() if k not in ("wall_s", "charged")} for r in d]  # noqa: E731
                            for d in res.per_device]
    assert emulated(fast) == emulated(per_op)
    assert len(fast.per_device[0][-1]["ready_s"]) > 2  # several buckets, each with its moment
    assert [s["step_s"] for s in fast.steps] == [s["step_s"] for s in per_op.steps]


def test_metrics_add_up(cluster):
    res = cluster.train("gpt-tiny", steps=3, per_device_batch=2)
    for s in res.steps:
        assert set(STEP_COLUMNS) <= set(s)
        assert s["step_s"] == pytest.approx(s["compute_s"] + s["exposed_comm_s"] + s["other_s"], rel=1e-9)
        assert 0 < s["exposed_comm_s"] <= s["comm_s"] and 0 < s["mfu"] < 1
        assert s["tokens_per_s"] == pytest.approx(s["samples_per_s"] * 64)
        assert s["energy_j"] == pytest.approx(4 * 700 * s["step_s"])  # 4 h100 at 700 W
    assert res.summary()["energy_per_token_j"] == pytest.approx(
        res.summary()["energy_j"] / (4 * 2 * 64))


def test_overlap_hides_communication(cluster):
    """With overlap the buckets' all-reduces run during backward; without, all after it."""
    cluster.configure(System("h100", 4, scaleup_gbps=1))  # slow links: communication matters
    kw = dict(steps=2, per_device_batch=2, bucket_mb=0.05)
    on, off = cluster.train("gpt-tiny", overlap=True, **kw), cluster.train("gpt-tiny", overlap=False, **kw)
    assert on.losses == off.losses
    assert on.steps[-1]["exposed_comm_s"] < off.steps[-1]["exposed_comm_s"]
    assert off.steps[-1]["exposed_comm_s"] == pytest.approx(off.steps[-1]["comm_s"])
    assert on.steps[-1]["step_s"] < off.steps[-1]["step_s"]


def test_slower_chip_gives_a_longer_step(cluster):
    fast = cluster.train("mlp", steps=2, per_device_batch=4).steps[-1]["compute_s"]
    cluster.configure(System("tpu-v5e", 4))
    assert cluster.train("mlp", steps=2, per_device_batch=4).steps[-1]["compute_s"] > fast


def test_wall_clock_training_runs(cluster):
    cluster.configure(clock="wall")
    res = cluster.train("mlp", steps=4, per_device_batch=4)
    assert res.config["dilation"] > 1 and 0 < res.summary()["fidelity"] <= 1
    assert res.losses == pytest.approx(train_single(get("mlp"), 4, 16)[0], abs=1e-5)
    # the last two steps were replayed (paced per segment), and charged what the recorded ones were
    rows = res.per_device[0]
    assert [r["charged"] for r in rows] == ["record", "record", "replay", "replay"]
    assert rows[3]["compute_s"] == pytest.approx(rows[1]["compute_s"], rel=1e-9)


# a user's workload, defined in a test module and named by import path
def _build():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _batches(rank, world, per_device_batch, seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(world * per_device_batch, 4, generator=g)
        yield shard((x, x.sum(1, keepdim=True)), rank, world)


def _loss(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


tiny = Workload(_build, _batches, _loss, name="tiny", lr=0.05)


def make_tiny():
    return tiny


@pytest.mark.parametrize("path", [f"{__name__}:tiny", f"{__name__}:make_tiny"])
def test_a_custom_workload_by_import_path_trains(cluster, path):
    res = cluster.train(path, steps=25, per_device_batch=8, optimizer="sgd")
    assert res.config["workload"] == "tiny" and res.losses[-1] < 0.5 * res.losses[0]


@pytest.mark.parametrize("path,match", [
    ("no_such_module_xyz:w", "module 'no_such_module_xyz' could not be imported"),
    (f"{__name__}:nothing_here", "has no attribute 'nothing_here'"),
    (f"{__name__}:ATOL", "is a dict, not a relay.Workload"),
    ("gpt-huge", "neither a built-in .* nor an import path"),
])
def test_bad_workload_paths_say_what_was_not_found(path, match):
    with pytest.raises(ValueError, match=match):
        get(path)


def test_memory_check_names_both_figures(cluster):
    small = Chip(**{**get_chip("h100").as_dict(), "name": "h100-1mb", "hbm_gb": 0.001})
    cluster.configure(System(small, 4))
    with pytest.raises(ValueError, match=r"memory: gpt-tiny needs .* GB per device .* but h100-1mb has 0.001 GB"):
        cluster.train("gpt-tiny", steps=1, per_device_batch=64)


def test_the_readme_example_runs_as_written(ray_session, capsys):
    runpy.run_path("examples/custom_model.py", run_name="__main__")  # as a script, on the session's Ray
    assert "samples/s (emulated)" in capsys.readouterr().out
