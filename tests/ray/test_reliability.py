"""Failures, stragglers, mixed chips, durable results and concurrent runs."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from relay import Cluster, DeviceError, Faults, System, train_single
from relay.device import jobs
from relay.workloads import get

ROOT = Path(__file__).resolve().parents[2]
BOUND_S = 10  # the failure bound these tests configure (timeout_s)


def gone(pids):
    return not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # (it may end between any two looks at it)
        return False


@pytest.mark.timeout(120)
def test_a_device_killed_mid_training_fails_the_run_and_keeps_completed_steps(ray_session):
    cluster = Cluster(System("h100", 4), timeout_s=BOUND_S, faults=Faults(fail=(2, 3))).start()
    pids = list(cluster.pids)
    with pytest.raises(DeviceError) as e:
        cluster.train("mlp", steps=8, per_device_batch=4)
    err = e.value
    assert (err.device, err.step, err.what) == (2, 3, "training") and "process died" in err.cause
    assert "device 2 failed during training in step 3" in str(err)
    assert [s["step"] for s in err.completed.steps] == [0, 1, 2]
    assert err.completed.losses == pytest.approx(train_single(get("mlp"), 3, 16)[0], abs=1e-5)
    assert cluster.actors == [] and gone(pids)  # every other device was stopped too


def test_device_0_killed_mid_plan_training_keeps_completed_steps(ray_session):
    """Under a parallel plan, device 0 also serves the run's rendezvous store: when it dies, closing
    the store must not stop the other devices before their finished steps are collected."""
    from relay import Parallel
    cluster = Cluster(System("h100", 4), timeout_s=BOUND_S, faults=Faults(fail=(0, 3))).start()
    with pytest.raises(DeviceError) as e:
        cluster.train("mlp", parallel=Parallel(dp=4), steps=8, per_device_batch=4)
    err = e.value
    assert (err.device, err.step) == (0, 3) and "process died" in err.cause
    assert [s["step"] for s in err.completed.steps] == [0, 1, 2]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("data_plane", ["auto", "gloo"])
def test_a_device_killed_mid_collective_fails_the_call_on_either_data_plane(ray_session, data_plane):
    # a 60 s timeout: the call must fail on seeing the device gone, not on waiting it out
    cluster = Cluster(System("h100", 4), timeout_s=60, faults=Faults(fail=(1, 2)), data_plane=data_plane).start()
    pids = list(cluster.pids)
    carrier = "shm" if data_plane == "auto" else "gloo"
    assert cluster.run(jobs.carriers)[0] == {1: carrier, 2: carrier, 3: carrier}
    with pytest.raises(DeviceError) as e:
        cluster.all_reduce([torch.ones(3 << 20)] * 4, algorithm="ring")  # 3 MB ring steps: several slots
    assert e.value.device == 1 and e.value.what == "all_reduce (ring)" and "process died" in e.value.cause
    assert cluster.actors == [] and gone(pids)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("relay-") and int(f.rsplit(".", 1)[1]) in pids]


@pytest.mark.timeout(120)
def test_a_device_that_stops_answering_is_named(ray_session):
    cluster = Cluster(System("h100", 2), timeout_s=5).start()
    pids = list(cluster.pids)
    threading.Timer(2.0, lambda: os.kill(pids[1], signal.SIGSTOP)).start()
    with pytest.raises(DeviceError) as e:
        cluster.train("gpt-tiny", steps=10_000, per_device_batch=2)
    assert e.value.device == 1 and "stopped answering" in e.value.cause
    assert e.value.completed is not None and e.value.step == len(e.value.completed.steps) > 0
    assert gone(pids)


@pytest.mark.parametrize("algorithm", ["ring", "tree"])
def test_a_straggler_sets_the_step_under_the_virtual_clock(cluster, algorithm):
    kw = dict(steps=2, per_device_batch=4, algorithm=algorithm)
    base = cluster.train("mlp", **kw).steps[-1]
    cluster.configure(faults=Faults(compute_slowdown={1: 3.0}))
    slow = cluster.train("mlp", **kw)
    again = cluster.train("mlp", **kw)
    cluster.configure(faults=Faults())
    s = slow.steps[-1]
    # the step follows the slowest device: its compute is 3x, and the all-reduce cannot finish sooner
    assert 3 * base["compute_s"] <= s["step_s"] <= 3 * base["compute_s"] + base["comm_s"] + 1e-12
    fast = slow.per_device[0][-1]  # a fast device waits inside the all-reduce for the slow one
    assert fast["exposed_comm_s"] >= 2 * base["compute_s"]
    assert [x["step_s"] for x in slow.steps] == [x["step_s"] for x in again.steps]  # deterministic
    assert slow.losses == pytest.approx(train_single(get("mlp"), 2, 16)[0], abs=1e-5)  # same training


def test_a_straggler_link_slows_communication_only(cluster):
    kw = dict(steps=2, per_device_batch=4)
    base = cluster.train("gpt-tiny", **kw).steps[-1]
    cluster.configure(faults=Faults(link_slowdown={2: 8.0}))
    slow = cluster.train("gpt-tiny", **kw).steps[-1]
    cluster.configure(faults=Faults())
    assert slow["compute_s"] == base["compute_s"] and slow["comm_s"] > 2 * base["comm_s"]


def test_a_mixed_system_trains_each_device_at_its_own_chip(cluster):
    mixed = System.mixed([("910c", 2), ("h100", 2)])
    cluster.configure(mixed)
    res = cluster.train("mlp", steps=3, per_device_batch=4, batch_scale=256)
    assert res.losses == pytest.approx(train_single(get("mlp"), 3, 16)[0], abs=1e-5)
    rows = [d[-1] for d in res.per_device]
    # each device is charged as its own chip (which is faster depends on the shapes: the 910C's
    # unit count is unpublished, so its GEMMs pay no wave quantisation)
    assert rows[0]["compute_s"] == rows[1]["compute_s"] != rows[2]["compute_s"] == rows[3]["compute_s"]
    assert res.steps[-1]["step_s"] >= max(r["compute_s"] for r in rows)  # the slower chip sets the pace
    # chip power (the 910C's estimate, 800 W): a mixed system has no all-in figure
    assert res.config["power_basis"] == "chip"
    assert res.steps[-1]["energy_j"] == pytest.approx((2 * 800 + 2 * 700) * res.steps[-1]["step_s"])


def relay(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "relay.launch.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


@pytest.mark.timeout(300)
def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path):
    argv = ["sweep", "--chips", "h100", "--devices", "1,2,3", "--workload", "gpt-tiny", "--steps", "2",
            "--out", str(tmp_path), "--name", "s"]
    points = tmp_path / "s" / "points.csv"
    first = relay(*argv)
    deadline = time.time() + 200
    while time.time() < deadline and first.poll() is None:
        if points.exists() and len(points.read_text().splitlines()) - 1 >= 1:
            break
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep and its embedded Ray, mid-way
    first.wait()
    before = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert before["status"] == "partial" and 1 <= len(before["points"]) < 3
    second = relay(*argv)
    out, err = second.communicate(timeout=240)
    assert second.returncode == 0, err[-2000:]
    assert f"{len(before['points'])} point(s) already run, skipped" in err
    after = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert after["status"] == "complete" and len(after["points"]) == 3
    assert after["points"][:len(before["points"])] == before["points"]  # kept as measured
    steps = (tmp_path / "s" / "steps.csv").read_text().splitlines()
    assert len(steps) == 1 + 3 * 2  # every point's steps, the resumed ones' included
    assert not list((tmp_path / "s").glob(".*.json*")) and not list((tmp_path / "s").glob(".*.csv*"))


@pytest.mark.timeout(300)
def test_two_runs_at_once_do_not_collide(tmp_path):
    argv = ["run", "--chip", "h100", "--devices", "2", "--workload", "mlp", "--steps", "2", "--out", str(tmp_path)]
    runs = [relay(*argv, "--name", name) for name in ("a", "b")]
    outs = [r.communicate(timeout=240) for r in runs]
    for r, (out, err) in zip(runs, outs):
        assert r.returncode == 0, err[-2000:]
    for name in ("a", "b"):
        assert json.loads((tmp_path / name / "summary.json").read_text())["summary"]["final_loss"] > 0


def test_a_results_folder_in_use_is_refused(tmp_path):
    from relay.results.folder import ResultsDir
    (tmp_path / "busy").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "busy" / ".lock").write_text(str(holder.pid))
        with pytest.raises(ValueError, match=r"is being written by another relay \(pid \d+\); choose another --name"):
            ResultsDir(tmp_path, "busy")
    finally:
        holder.kill()
    holder.wait()
    ResultsDir(tmp_path, "busy").release()  # a lock left by a process that is gone is taken over


def _slow_loss(model, batch):
    """The mlp's loss, 0.4 s of host time per step: a run long enough to poll many times."""
    time.sleep(0.4)
    return get("mlp").loss(model, batch)


def test_progress_rows_arrive_while_a_long_run_trains(cluster, monkeypatch):
    # The driver polls the devices' progress every second while they train (the progress bar
    # and the steps kept on a failure come from it). Rows must keep arriving during the run,
    # not only once at its start: every poll records how many steps each device had reported.
    from dataclasses import replace

    from relay.driver import training as training_module
    seen = []
    poll = training_module._Progress.poll

    def recording_poll(self):
        seen.append(min(len(r) for r in self.rows))
        poll(self)

    monkeypatch.setattr(training_module._Progress, "poll", recording_poll)
    steps = 12
    cluster.train(replace(get("mlp"), loss=_slow_loss, name="slow-mlp"), steps=steps, per_device_batch=4)
    assert len(seen) >= 3, seen  # the loop kept polling (on main it polled once)
    partial = [n for n in seen if 0 < n < steps]
    assert partial, f"no poll saw a run in progress: {seen}"
    assert seen == sorted(seen)
