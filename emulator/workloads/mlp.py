"""`mlp`: a small MLP learning a fixed random teacher network (teacher-student regression).
The student is larger than the teacher, so the loss can fall towards 0."""

from __future__ import annotations

import functools

import torch
from torch import nn

from relay.workloads import Workload, shard

D_IN, HIDDEN, D_OUT, TEACHER_HIDDEN = 32, 128, 8, 32


@functools.lru_cache(maxsize=1)
def teacher() -> nn.Module:
    gen = torch.Generator().manual_seed(1234)
    net = nn.Sequential(nn.Linear(D_IN, TEACHER_HIDDEN), nn.Tanh(), nn.Linear(TEACHER_HIDDEN, D_OUT))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return net.requires_grad_(False)


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
                         nn.Linear(HIDDEN, D_OUT))


def batches(rank: int, world: int, per_device_batch: int, seed: int):
    gen, step = torch.Generator(), 0
    while True:  # the global batch of each step depends only on (seed, step): any world agrees
        gen.manual_seed(seed * 1_000_003 + step)
        x = torch.randn(world * per_device_batch, D_IN, generator=gen)
        with torch.no_grad():
            y = teacher()(x)
        yield shard((x, y), rank, world)
        step += 1


def loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


workload = Workload(build_model, batches, loss, name="mlp", lr=3e-3, loss_floor=0.0)
