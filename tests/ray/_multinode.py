"""Run by test_multinode.py in a process of its own (one driver holds one Ray cluster): a Ray
cluster of three nodes on this machine (ray.cluster_utils), each worker node with room for four
devices, and Relay on top of it. Prints what it saw as JSON."""

import json
import os
import tempfile

import torch
from ray.cluster_utils import Cluster as RayCluster

from relay import Cluster, System
from relay.device import jobs
from relay.device.backend.program import Program
from relay.driver.monitor import DeviceError
from relay.driver.programs import launch
from relay.driver.session import MEMORY_MB

MB = 2**20
room = int(4.5 * MEMORY_MB * MB)  # four devices fit on a node, five do not
ray_cluster = RayCluster(initialize_head=True, head_node_args={"num_cpus": 1, "memory": 100 * MB,
                                                               "object_store_memory": 100 * MB})
for _ in range(2):
    ray_cluster.add_node(num_cpus=1, memory=room, object_store_memory=100 * MB)
ray_cluster.wait_for_nodes()
out = {}
try:
    with Cluster(System("h100", 8, domain=4), address=ray_cluster.address) as cluster:
        out["nodes"] = [i["node_id"] for i in cluster.info]
        out["carriers"] = cluster.run(jobs.carriers, devices=len(cluster.actors))
        res = cluster.all_reduce([torch.full((1000,), float(d)) for d in range(8)], algorithm="hierarchical")
        out["all_reduce"] = all(torch.equal(o, torch.full((1000,), 28.0)) for o in res.outputs)
        out["all_reduce_s"] = res.emulated_s
        run = cluster.train("mlp", steps=3, per_device_batch=4, algorithm="ring")
        out["losses"] = run.losses
        # a script's output from devices on other nodes than the driver's comes back with the result
        logs = tempfile.mkdtemp()
        with open(os.path.join(logs, "hello.py"), "w") as f:
            f.write("import os\nprint('hello from', os.environ['RANK'])\n")
        res = launch(cluster, Program(script=os.path.join(logs, "hello.py"), log_dir=logs))
        out["outputs"] = [d["output"] for d in res.per_device]
        out["logs_written_here"] = sorted(os.listdir(logs))
        # a failed device on another node sends its whole output back with its error
        with open(os.path.join(logs, "fail.py"), "w") as f:
            f.write("import os\nfor i in range(60):\n    print('line', i)\n"
                    "if os.environ['RANK'] == '5':\n    raise ValueError('device five')\n")
        try:
            launch(cluster, Program(script=os.path.join(logs, "fail.py"), log_dir=logs))
        except DeviceError as e:
            out["failed"] = [e.device, sorted(e.logs), e.logs.get(5, "").splitlines()[:2]]
    try:
        Cluster(System("h100", 12), address=ray_cluster.address).start()
    except ValueError as e:
        out["too_many"] = str(e)
finally:
    ray_cluster.shutdown()
print("RESULT " + json.dumps(out))
