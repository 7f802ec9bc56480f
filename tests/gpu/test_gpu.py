"""GPU tier: runs only where CUDA is present (never in CI); skipped cleanly elsewhere."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_throttle_charges_cuda_ops_like_cpu_ones():
    from relay import chips
    from relay.kernels.clock import VirtualLane
    from relay.kernels.cost import CostModel
    from relay.kernels.throttle import Throttle
    a = torch.randn(256, 256, device="cuda")
    lane = VirtualLane()
    with Throttle(CostModel(chips.get("h100")), lane, sync_cuda=True):
        a @ a
    assert lane.t == CostModel(chips.get("h100")).matmul_cost(256, 256, 256).seconds


def test_devices_run_on_the_gpu(ray_session):
    from relay import Cluster, System
    with Cluster(System("h100", 2), device="cuda") as cluster:
        out = cluster.run_matmuls([512])
        res = cluster.train("mlp", steps=2, per_device_batch=4)
    assert all(r["emulated_s"] > 0 for r in out) and len(res.steps) == 2
