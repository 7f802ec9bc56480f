"""Devices on a multi-node Ray cluster, and `relay cluster up / status / down`, end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from _sockets import listening, loopback  # tests/ray is on the path (no package)

from relay import System, train_single
from relay.collectives import simulate
from relay.workloads import get

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def test_domains_land_on_one_node_each_and_devices_work_across_nodes():
    out = subprocess.run([sys.executable, str(HERE / "_multinode.py")], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, out.stderr[-3000:]
    seen = json.loads(line[len("RESULT "):])
    nodes = seen["nodes"]
    assert len(set(nodes[:4])) == 1 and len(set(nodes[4:])) == 1  # each domain on one node
    assert nodes[0] != nodes[4]  # the two domains on two nodes
    # shared memory within a node, gloo across (these nodes share one host: decided by node id)
    for i, carriers in enumerate(seen["carriers"]):
        assert carriers == {str(j): "shm" if nodes[i] == nodes[j] else "gloo" for j in range(8) if j != i}
    assert seen["all_reduce"]  # a collective across the nodes
    assert seen["all_reduce_s"] == simulate("all_reduce", "hierarchical", 4000, System("h100", 8, domain=4))
    assert seen["losses"] == pytest.approx(train_single(get("mlp"), 3, 32)[0], abs=1e-5)  # training too
    # no device is on the driver's node: each sends its output back instead of writing the log
    assert seen["outputs"] == [f"hello from {d}\n" for d in range(8)] and seen["logs_written_here"] == ["hello.py"]
    # a failed script on another node: its whole output comes back (not only the last 40 lines)
    assert seen["failed"] == [5, [5], ["line 0", "line 1"]]
    assert "room for 8 more device(s)" in seen["too_many"] and "12 were asked" in seen["too_many"]


def relay(*args, env):
    return subprocess.run([sys.executable, "-m", "relay.launch.cli", *args], capture_output=True, text=True,
                          timeout=240, cwd=ROOT, env=env)


def test_cluster_up_status_down_end_to_end(tmp_path):
    env = dict(os.environ, RELAY_HOME=str(tmp_path / "home"))
    up = relay("cluster", "up", env=env)
    assert up.returncode == 0, up.stderr[-2000:]
    record = json.loads((tmp_path / "home" / "cluster.json").read_text())
    try:
        assert record["address"] in up.stdout and "relay cluster down" in up.stdout
        # without --host, loopback only (Ray on its own would take 127.0.0.1 as the LAN address)
        servers = listening([p for p in psutil.process_iter(["cmdline"])
                             if p.info["cmdline"] and any(record["temp_dir"] in c for c in p.info["cmdline"])])
        assert servers and [s for s in servers if not loopback(s[0])] == []
        run = relay("run", "--address", "recorded", "--chip", "h100", "--devices", "2", "--workload", "mlp",
                    "--steps", "2", "--out", str(tmp_path / "results"), "--name", "r", env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        assert (tmp_path / "results" / "r" / "summary.json").exists()
        status = relay("cluster", "status", env=env)
        assert status.returncode == 0, status.stderr[-2000:]
        assert "devices that fit" in status.stdout and "1 node(s)" in status.stdout
        again = relay("cluster", "up", env=env)
        assert again.returncode == 2 and "already up" in again.stderr
    finally:
        down = relay("cluster", "down", env=env)
    assert down.returncode == 0, down.stderr[-2000:]
    left = [p for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and any(record["temp_dir"] in c for c in p.info["cmdline"])]
    assert left == []
    assert not (tmp_path / "home" / "cluster.json").exists()
    assert relay("cluster", "down", env=env).returncode == 2  # nothing left to stop
