"""`llama3-8b`, `llama3-70b`, `llama3-405b` and `llama-debug`: the Llama 3 architecture, in the
style of nanoGPT: RMSNorm, rotary position embeddings, grouped-query attention through
F.scaled_dot_product_attention, and a SwiGLU feed-forward. Random-initialised; nothing is
downloaded. The full sizes train on fake tensors (emulator/device/fake/measure.py); `llama-debug`
trains for real.

Shapes: Llama 3 paper (Grattafiori et al., arXiv 2407.21783), Table 3, and the released
configurations (vocab 128256, RMSNorm eps 1e-5, untied input and output embeddings,
rope theta 500000, 8K-token pre-training context).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from relay.workloads import tokens


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 128256  # tokens
    seq_len: int = 8192  # tokens per sample (the pre-training context)
    dim: int = 4096  # model width d
    n_layers: int = 32  # transformer blocks
    n_heads: int = 32  # query heads; head size = dim / n_heads
    n_kv_heads: int = 8  # key/value heads (grouped-query attention), dividing n_heads
    ffn_dim: int = 14336  # SwiGLU hidden width
    rope_theta: float = 500000.0  # rotary base
    norm_eps: float = 1e-5  # RMSNorm epsilon

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim = {self.dim}, n_heads = {self.n_heads}, n_kv_heads = {self.n_kv_heads}: "
                             "n_heads must divide dim and n_kv_heads must divide n_heads")


CONFIGS = {
    "llama3-8b": LlamaConfig(),
    "llama3-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
    "llama3-405b": LlamaConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248),
    # small enough to train for real in tests, with every feature of the full sizes (GQA included)
    "llama-debug": LlamaConfig(vocab_size=256, seq_len=32, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                               ffn_dim=128, rope_theta=10000.0),
}


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (T, hs), the two halves of a head sharing a frequency."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (hs/2,)
    angles = torch.outer(torch.arange(seq_len).float(), inv_freq)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (..., T, hs): each pair (x_i, x_{i + hs/2}) turned by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    # in the tables' fp32 and back to x's dtype, as torchtitan's and Megatron's rotary do
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.dim // c.n_heads
        self.wq = nn.Linear(c.dim, c.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(c.dim, c.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(c.dim, c.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * self.head_dim, c.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        # each group of nh / nkv query heads shares one key/value head, without copying them
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, nh, T, hs)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x):  # (..., d) -> (..., d)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.RMSNorm(c.dim, eps=c.norm_eps), nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.attn, self.ffn = Attention(c), SwiGLU(c.dim, c.ffn_dim)

    def forward(self, x, cos, sin):  # x: (B, T, d)
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """The decoder stack both model families share: embeddings, blocks, final norm, output head."""

    def __init__(self, c, blocks: list[nn.Module], rope_dim: int):
        super().__init__()
        self.config = c
        self.tok = nn.Embedding(c.vocab_size, c.dim)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)  # untied from tok, as in Llama 3
        cos, sin = rope_tables(rope_dim, c.seq_len, c.rope_theta)
        self.register_buffer("cos", cos, persistent=False)  # (T, rope_dim)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(_init)

    def forward(self, idx):  # idx: (B, T) token ids -> logits (B, T, vocab)
        T = idx.shape[1]
        cos, sin = self.cos[:T], self.sin[:T]
        x = self.tok(idx)  # (B, T, d)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


def _init(m: nn.Module) -> None:
    """nanoGPT's initialisation: N(0, 0.02) weights (none on the meta device, where it would do
    nothing but cost host time: seconds for a full-size model's thousands of tensors)."""
    if isinstance(m, (nn.Linear, nn.Embedding)) and not m.weight.is_meta:
        nn.init.normal_(m.weight, mean=0.0, std=0.02)


def build(c: LlamaConfig) -> Transformer:
    return Transformer(c, [Block(c) for _ in range(c.n_layers)], rope_dim=c.dim // c.n_heads)


# workload(name, config=None), and the import paths BUILTINS names the configurations by
workload, __getattr__ = tokens.named(CONFIGS, build)
