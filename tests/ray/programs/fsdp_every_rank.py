"""FSDP2 over a "cuda" mesh of every rank, each rank doing the same work (what a shared launch
assumes: tests/ray/test_launch_shared.py). Each rank prints its own step time, timed with
time.perf_counter around a synchronized step. Arguments: width batch steps."""

import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

width, batch, steps = (int(x) for x in sys.argv[1:4])
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
mesh = init_device_mesh("cuda", (dist.get_world_size(),))
model = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)).cuda()
for layer in (model[0], model[2]):
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
data = torch.Generator().manual_seed(1 + dist.get_rank())
for step in range(steps):
    x = torch.randn(batch, width, generator=data).cuda()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = (model(x) - x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    torch.cuda.synchronize()
    print(f"step {step}: {(time.perf_counter() - t0) * 1e3:.6f} ms", flush=True)
dist.destroy_process_group()
