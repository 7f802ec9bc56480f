"""Plug in your own model: a complete example (the README shows this file; a test runs it).

Run it:  .venv/bin/python examples/custom_model.py
Or from the command line:  relay run --workload examples.custom_model:workload --chip h100 --devices 4
"""

import torch
from torch import nn

from relay import Cluster, System, Workload


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))


def batches(rank, world, per_device_batch, seed):
    """Each step's global batch depends only on (seed, step); rank `rank` takes its slice."""
    gen, step = torch.Generator(), 0
    while True:
        gen.manual_seed(seed * 100_003 + step)
        x = torch.randn(world * per_device_batch, 16, generator=gen)
        y = x.sum(dim=1, keepdim=True).sin()  # something to learn
        lo = rank * per_device_batch
        yield x[lo:lo + per_device_batch], y[lo:lo + per_device_batch]
        step += 1


def loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


workload = Workload(build_model, batches, loss, name="sine-regression", lr=1e-2)

if __name__ == "__main__":
    with Cluster(System("ascend-910c", 4), clock="virtual") as cluster:
        result = cluster.train(workload, steps=30, per_device_batch=16, algorithm="ring")
    s = result.summary()
    print(f"loss {result.steps[0]['loss']:.3f} -> {result.steps[-1]['loss']:.3f}; "
          f"emulated step {s['step_s'] * 1e6:.1f} us, {s['samples_per_s']:.0f} samples/s (emulated)")
