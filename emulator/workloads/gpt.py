"""`gpt-tiny`: a small decoder-only transformer learning a synthetic language.

The language is a random first-order Markov chain over VOCAB tokens. Sequences start in the
chain's stationary distribution, so the best any model can do on next-token prediction is the
chain's entropy rate, H = -sum_i pi_i sum_j P_ij log P_ij (nats per token), computed exactly
here: `gpt-tiny`'s loss has a known floor."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn import functional as F

from relay.workloads import Workload, shard

VOCAB, SEQ, D_MODEL, N_LAYER, N_HEAD = 32, 64, 64, 2, 4
CONCENTRATION = 0.2  # Dirichlet parameter of each transition row: lower is more predictable


@functools.lru_cache(maxsize=1)
def chain() -> tuple[torch.Tensor, torch.Tensor, float]:
    """Transition matrix P (VOCAB x VOCAB), stationary distribution pi, entropy rate (nats)."""
    gen = torch.Generator().manual_seed(2024)
    g = torch._standard_gamma(torch.full((VOCAB, VOCAB), CONCENTRATION, dtype=torch.float64), generator=gen)
    P = g / g.sum(1, keepdim=True)
    vals, vecs = torch.linalg.eig(P.T)
    pi = vecs[:, torch.argmin((vals - 1).abs())].real
    pi = pi / pi.sum()
    plogp = torch.where(P > 0, P * P.log(), torch.zeros_like(P))
    return P, pi, float(-(pi * plogp.sum(1)).sum())


def entropy_rate() -> float:
    return chain()[2]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.qkv, self.proj = nn.Linear(D_MODEL, 3 * D_MODEL), nn.Linear(D_MODEL, D_MODEL)
        self.mlp = nn.Sequential(nn.Linear(D_MODEL, 4 * D_MODEL), nn.GELU(), nn.Linear(4 * D_MODEL, D_MODEL))
        self.register_buffer("mask", torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool)), persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // N_HEAD)  # (B, nh, T, T)
        att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, D_MODEL), nn.Embedding(SEQ, D_MODEL)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln, self.head = nn.LayerNorm(D_MODEL), nn.Linear(D_MODEL, VOCAB, bias=False)

    def forward(self, idx):  # idx: (B, T) token ids -> logits (B, T, VOCAB)
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def batches(rank: int, world: int, per_device_batch: int, seed: int):
    P, pi, _ = chain()
    gen, step = torch.Generator(), 0
    while True:
        gen.manual_seed(seed * 1_000_003 + step)
        n = world * per_device_batch
        seq = torch.empty(n, SEQ + 1, dtype=torch.long)
        seq[:, 0] = torch.multinomial(pi.float(), n, replacement=True, generator=gen)
        for t in range(SEQ):
            seq[:, t + 1] = torch.multinomial(P[seq[:, t]].float(), 1, generator=gen).squeeze(1)
        yield shard((seq[:, :-1], seq[:, 1:]), rank, world)
        step += 1


def loss(model: nn.Module, batch) -> torch.Tensor:
    idx, targets = batch
    return F.cross_entropy(model(idx).reshape(-1, VOCAB), targets.reshape(-1))


workload = Workload(TinyGPT, batches, loss, name="gpt-tiny", tokens_per_sample=SEQ, lr=3e-3,
                    loss_floor=entropy_rate())
