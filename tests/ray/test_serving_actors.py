"""Decode on Relay's device actors: DeepSeek-V3's shape in miniature (moe-debug: MLA's compressed
cache, a shared expert) served with attention data parallel and expert parallel over 4 devices,
each device's tokens dispatched to their experts' devices and combined back through the `relay`
backend's all-to-all (device/training/experts.py), equals one process's greedy tokens."""

import torch
import torch.distributed as dist

from relay import System
from relay.workloads import get, inference


def ep_decode(prompts, new_tokens):
    """This device's share of the prompts (attention data parallel), every MoE layer's experts
    spread over the devices (n_experts / world each), greedy decode with the KV cache."""
    from relay.device.training.experts import expert_parallel
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = get("moe-debug").build_model().eval()
    expert_parallel(model, dist.group.WORLD, world, rank)
    held = [len(b.ffn.experts) for b in model.blocks if hasattr(b.ffn, "routing")]
    return inference.generate(model, prompts.chunk(world)[rank], new_tokens), held


def test_expert_parallel_decode_on_devices_equals_one_process(cluster):
    cluster.configure(System("h100", 4), clock="virtual")
    prompts = torch.randint(0, 256, (8, 6), generator=torch.Generator().manual_seed(3))
    res = cluster.launch(ep_decode, prompts, 6)
    torch.manual_seed(0)
    want = inference.generate(get("moe-debug").build_model().eval(), prompts, 6)
    assert torch.equal(torch.cat([tokens for tokens, _ in res.results]), want)
    assert all(held == [2, 2] for _, held in res.results)  # 8 experts over 4 devices, in both MoE layers
    # the devices exchanged the dispatch and combine: emulated communication was charged
    assert res.emulated_s > 0
