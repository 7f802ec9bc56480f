"""Data-parallel training with PyTorch's own DistributedDataParallel. Runs unchanged under
torchrun (`torchrun --nproc-per-node 4 examples/torch_ddp.py`) or on emulated devices
(`relay launch --chip h100 --devices 4 examples/torch_ddp.py`)."""
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import relay.dist  # report() feeds Relay's throughput figure; it does nothing elsewhere

dist.init_process_group("gloo")  # under `relay launch` this starts the "relay" backend
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = DDP(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
data = torch.Generator().manual_seed(1 + rank)  # each rank its own samples
for step in range(5):
    x = torch.randn(16, 32, generator=data)
    loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin())
    opt.zero_grad()
    loss.backward()  # gradients are averaged bucket by bucket while backward runs
    opt.step()
    relay.dist.report(samples=len(x))
    if rank == 0:
        print(f"step {step}: loss {loss.item():.4f}")
dist.destroy_process_group()
