"""Device actors on the shared local Ray cluster."""

import psutil
import pytest
import ray
from _sockets import listening, loopback  # tests/ray is on the path (no package)

from relay import Cluster, System, chips
from relay.driver.collectives import CollectiveResult
from relay.kernels.gemm import quantisation


def test_actors_are_separate_processes_with_one_thread_of_torch(cluster):
    pids = cluster.pids[:4]
    assert len(set(pids)) == 4 and all(psutil.pid_exists(p) for p in pids)
    threads = ray.get([a.__ray_call__.remote(lambda self: __import__("torch").get_num_threads())
                       for a in cluster.actors[:4]])
    assert threads == [1, 1, 1, 1]


def test_run_matmuls_reports_emulated_and_real_seconds(cluster):
    out = cluster.run_matmuls([128, 256])
    assert [r["device"] for r in out] == [0, 1, 2, 3]
    for r in out:
        assert r["emulated_s"] == r["modeled_s"] > 0  # the virtual clock follows the model exactly
        assert r["real_s"] > 0 and r["flops"] == 2 * (128**3 + 256**3)
        assert [s["size"] for s in r["sizes"]] == [128, 256]


def test_virtual_clock_gives_identical_emulated_times_across_runs(cluster):
    a = cluster.run_matmuls([64, 192, 320], repeats=[3, 2, 1])
    b = cluster.run_matmuls([64, 192, 320], repeats=[3, 2, 1])
    assert [r["emulated_s"] for r in a] == [r["emulated_s"] for r in b]
    assert [[s["emulated_s"] for s in r["sizes"]] for r in a] == [[s["emulated_s"] for s in r["sizes"]] for r in b]


def test_slower_chip_takes_longer_by_the_modeled_ratio(cluster):
    fast = cluster.run_matmuls([1024])[0]["emulated_s"]
    cluster.configure(System("a100", 4))
    slow = cluster.run_matmuls([1024])[0]["emulated_s"]
    # each chip's published best-shape efficiency, times the 1024 x 1024 output's quantisation on its SMs
    a100, h100 = chips.get("a100"), chips.get("h100")
    assert slow / fast == pytest.approx(
        (4e-6 + 2 * 1024**3 / (312e12 * a100.matmul_eff * quantisation(1024, 1024, 108, k=1024)))
        / (4e-6 + 2 * 1024**3 / (989.4e12 * h100.matmul_eff * quantisation(1024, 1024, 132, k=1024))), rel=1e-9)


def test_wall_clock_runs_and_reports_fidelity(cluster):
    cluster.configure(clock="wall")
    out = cluster.run_matmuls([64], repeats=2)
    assert all(r["dilation"] > 1 and 0 <= r["fidelity"] <= 1 for r in out)


def test_wall_clock_refuses_a_dilation_the_host_cannot_honour(cluster):
    cluster.configure(clock="wall", dilation=1e-3)
    with pytest.raises(ValueError, match="dilation = 0.001 is too small for this host"):
        cluster.run_matmuls([512])


def test_collective_result_unpacks_to_outputs_and_seconds(cluster):
    import torch
    outputs, seconds = cluster.all_reduce([torch.ones(5) for _ in range(4)])
    assert all(torch.equal(o, torch.full((5,), 4.0)) for o in outputs) and seconds > 0
    assert isinstance(cluster.broadcast([torch.ones(3)] * 4), CollectiveResult)


@pytest.mark.parametrize("kwargs,match", [
    (dict(clock="fast"), "clock = 'fast' is unknown"),
    (dict(clock="virtual", dilation=10), "dilation = 10 applies to clock='wall' only"),
    (dict(clock="wall", dilation=-1), "dilation = -1 is invalid"),
    (dict(device="tpu"), "device = 'tpu' is not a host device"),
    (dict(dtype="fp4"), "dtype = 'fp4' is not an emulated dtype"),
    (dict(efficiency={"matmul_eff": 2}), "matmul_eff = 2 is invalid"),
    (dict(timeout_s=0), "timeout_s = 0 is invalid"),
])
def test_bad_cluster_settings_fail_before_any_actor(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Cluster(System("h100", 2), **kwargs)


def test_exit_kills_every_actor_it_started(ray_session):
    with Cluster(System("a100", 2)) as c:
        pids = list(c.pids)
        assert all(psutil.pid_exists(p) for p in pids)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)
    assert ray.is_initialized()  # a cluster it did not start is left running


def test_the_embedded_ray_session_and_its_devices_listen_on_loopback_only(cluster):
    """conftest starts Ray as relay does without --address (session.start_local_ray). Every
    server of the session (GCS, raylet, this driver's and each worker's core worker) and of the
    devices (the transport's rendezvous store, gloo) listens on loopback, and Ray's clients need
    its token."""
    from ray._raylet import AuthenticationMode, get_authentication_mode
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    servers = listening(procs)
    devices = listening([p for p in procs if p.pid in cluster.pids[:1]])  # device 0 serves the store
    assert servers and devices <= servers
    assert [s for s in servers if not loopback(s[0])] == []
    assert get_authentication_mode() == AuthenticationMode.TOKEN


def test_a_programs_rendezvous_store_is_served_on_loopback_only(cluster):
    """The default group's store a launched program rendezvouses on is served by device 0 on
    MASTER_ADDR alone (torchrun's agent store), not by the program's rank 0 on every interface."""
    from _programs import rendezvous_servers
    servers = cluster.launch(rendezvous_servers).results
    assert servers[0] and all(loopback(ip) for ip, _ in servers[0])
    assert servers[1:] == [[]] * 3  # the other devices connect as clients


def test_a_sweep_of_sizes_reuses_the_same_actors(cluster):
    pids = list(cluster.pids)
    for n in (2, 3, 8, 4):
        cluster.configure(System("h100", n))
        cluster.run_matmuls([32])
    assert cluster.pids == pids
