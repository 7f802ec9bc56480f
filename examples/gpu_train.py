"""A training script written for GPUs, as torchrun runs it on a node of GPUs: Relay runs it
unmodified (README "Run a GPU training program unmodified"). It uses what such scripts use:
LOCAL_RANK and torch.cuda.set_device, the nccl backend, tensors made on and moved to "cuda",
DDP with device_ids (or FSDP2 over a "cuda" device mesh), bf16 autocast, CUDA events, memory
statistics and its own throughput line timed with time.perf_counter."""

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--width", type=int, default=256)
parser.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) over a cuda device mesh, not DDP")
args = parser.parse_args()

local_rank = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local_rank)
dist.init_process_group("nccl")
rank = dist.get_rank()
device = torch.device("cuda", local_rank)
if rank == 0:
    props = torch.cuda.get_device_properties(device)
    print(f"{torch.cuda.device_count()} x {props.name}, {props.total_memory / 1e9:.0f} GB each")

torch.manual_seed(0)
w = args.width
model = nn.Sequential(nn.Linear(w, 4 * w), nn.GELU(), nn.Linear(4 * w, w)).to(device)
if args.fsdp:
    mesh = init_device_mesh("cuda", (dist.get_world_size(),))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
else:
    model = DDP(model, device_ids=[local_rank])
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
data = torch.Generator().manual_seed(1 + rank)  # each rank its own samples
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
dist.barrier(device_ids=[torch.cuda.current_device()])
for step in range(args.steps):
    x = torch.randn(args.batch, w, generator=data).to(device, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    start.record()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = (model(x).float() - x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    end.record()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if rank == 0:
        print(f"step {step}: loss {loss.item():.4f} | {args.batch * dist.get_world_size() / dt:,.0f} samples/s "
              f"| step {dt * 1e3:.3f} ms (events {start.elapsed_time(end):.3f} ms) "
              f"| peak memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
dist.destroy_process_group()
