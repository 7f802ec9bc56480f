"""Synthetic token batches for the full-size language models (`llama*`, `deepseek-v3`, `mixtral-8x7b`).

The language: each token is the previous one plus 1 (mod vocab) with probability 1 - NOISE,
otherwise a uniformly random token. It costs nothing to generate at any vocabulary size (a
cumulative sum, no transition matrix), a model learns it in a few steps, and its entropy rate,
the best loss any model can reach, is known in closed form.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from relay.workloads import Workload, shard

NOISE = 0.2  # probability that a token is drawn uniformly instead of following its predecessor


def entropy_rate(vocab: int) -> float:
    """Nats per token: the next token is prev + 1 with probability q, each other one NOISE / vocab."""
    q, r = 1 - NOISE + NOISE / vocab, NOISE / vocab
    return -q * math.log(q) - (vocab - 1) * r * math.log(r)


def batches(vocab: int, seq_len: int):
    """The workload's batches(rank, world, per_device_batch, seed): (inputs, targets), each
    (B, seq_len) token ids; the global batch of a step depends only on (seed, step)."""

    def gen(rank: int, world: int, per_device_batch: int, seed: int):
        g, step = torch.Generator(), 0
        while True:
            g.manual_seed(seed * 1_000_003 + step)
            n = world * per_device_batch
            jump = torch.randint(0, vocab, (n, seq_len + 1), generator=g)  # a uniform step ...
            follow = torch.rand(n, seq_len + 1, generator=g) >= NOISE  # ... or plus one
            seq = torch.where(follow, torch.ones_like(jump), jump).cumsum(1) % vocab  # (n, T + 1)
            yield shard((seq[:, :-1], seq[:, 1:]), rank, world)
            step += 1

    return gen


def loss(model, batch) -> torch.Tensor:
    idx, targets = batch
    logits = model(idx)  # (B, T, vocab)
    # in fp32, as trainers compute it from low-precision logits (torchtitan, Megatron)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def named(configs: dict, build):
    """A model family's `workload(name, config=None)` (one of `configs`, or a custom configuration
    under that name) and its module `__getattr__`, through which BUILTINS' import paths
    (`relay.workloads.llama:llama3-8b`) reach the named workloads."""
    def family_workload(name: str, config=None) -> Workload:
        c = config or configs[name]
        return workload(name, lambda: build(c), c, lr=3e-3)

    def module_getattr(name: str):
        if name in configs:
            return family_workload(name)
        raise AttributeError(f"no workload named {name!r}; named: {', '.join(configs)}")
    return family_workload, module_getattr


def workload(name: str, build_model, config, lr: float) -> Workload:
    """A language-model workload on this synthetic language; config has vocab_size and seq_len."""
    return Workload(build_model, batches(config.vocab_size, config.seq_len), loss, name=name,
                    tokens_per_sample=config.seq_len, lr=lr, loss_floor=entropy_rate(config.vocab_size),
                    config=config)
