"""`deepseek-v3`, `mixtral-8x7b` and `moe-debug`: decoder-only mixtures of experts.

Each MoE layer routes every token to `top_k` of `n_experts` SwiGLU experts (real top-k on real
tensors; a routing model on fake ones, see routing.py) and adds `n_shared` always-active shared
experts. The dispatch is written the way expert parallelism needs it: the (token, choice) pairs
are sorted into one buffer grouped by expert, with a token count per expert, which is exactly
the input and the split sizes of an all_to_all_single; the outputs come back in that order and
are summed into their tokens, weighted by the gate.

Attention: DeepSeek-V3's multi-head latent attention (MLA: low-rank queries, keys and values
through a 512-wide latent, a 64-wide rotary key shared by all heads), or Llama's grouped-query
attention for Mixtral. Left out of DeepSeek-V3: multi-token prediction, group-limited routing
(8 groups, top 4) and the auxiliary-loss-free balancing bias, none of which changes the shapes
of the main model's work.

Shapes: DeepSeek-V3 technical report (arXiv 2412.19437), section 4.2 and its released
configuration (vocab 129280, dense SwiGLU 18432 in the first 3 layers, route scale 2.5, 4K
pre-training context); Mixtral of Experts (Jiang et al., arXiv 2401.04088), Table 1 (32K context).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from relay.kernels import moe_ops
from relay.workloads import llama, tokens
from relay.workloads.llama import SwiGLU, rotate


@dataclass(frozen=True)
class MoEConfig:
    vocab_size: int = 129280  # tokens
    seq_len: int = 4096  # tokens per sample (the pre-training context)
    dim: int = 7168  # model width d
    n_layers: int = 61  # transformer blocks
    n_dense_layers: int = 3  # the first blocks have a dense SwiGLU instead of experts
    ffn_dim: int = 18432  # dense SwiGLU hidden width
    n_experts: int = 256  # routed experts per MoE layer
    top_k: int = 8  # routed experts per token
    n_shared: int = 1  # shared experts per MoE layer, seen by every token
    expert_dim: int = 2048  # SwiGLU hidden width of one expert
    gate: str = "sigmoid"  # "sigmoid" (DeepSeek-V3: normalised over the top k) or "softmax" (Mixtral)
    route_scale: float = 2.5  # gate weights multiplied by this (DeepSeek-V3's routed scaling)
    attention: str = "mla"  # "mla" (multi-head latent attention) or "gqa" (as Llama)
    n_heads: int = 128  # query heads
    n_kv_heads: int = 8  # key/value heads, gqa only
    q_lora_rank: int = 1536  # mla: width of the query latent
    kv_lora_rank: int = 512  # mla: width of the key/value latent
    qk_nope_dim: int = 128  # mla: per-head query/key width without position
    qk_rope_dim: int = 64  # mla: per-head rotary width (one rotary key shared by every head)
    v_head_dim: int = 128  # mla: per-head value width
    rope_theta: float = 10000.0  # rotary base
    norm_eps: float = 1e-6  # RMSNorm epsilon

    def __post_init__(self):
        if self.gate not in ("sigmoid", "softmax") or self.attention not in ("mla", "gqa"):
            raise ValueError(f"gate = {self.gate!r}, attention = {self.attention!r}: choose gate 'sigmoid' "
                             "or 'softmax' and attention 'mla' or 'gqa'")
        if not 0 < self.top_k <= self.n_experts or not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(f"top_k = {self.top_k}, n_experts = {self.n_experts}, n_dense_layers = "
                             f"{self.n_dense_layers}, n_layers = {self.n_layers}: need 0 < top_k <= n_experts "
                             "and n_dense_layers <= n_layers")

    def llama(self) -> llama.LlamaConfig:
        """The dense block's configuration (gqa attention, dense SwiGLU)."""
        return llama.LlamaConfig(vocab_size=self.vocab_size, seq_len=self.seq_len, dim=self.dim,
                                 n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                                 ffn_dim=self.ffn_dim, rope_theta=self.rope_theta, norm_eps=self.norm_eps)


CONFIGS = {
    "deepseek-v3": MoEConfig(),
    "mixtral-8x7b": MoEConfig(vocab_size=32000, seq_len=32768, dim=4096, n_layers=32, n_dense_layers=0,
                              n_experts=8, top_k=2, n_shared=0, expert_dim=14336, gate="softmax",
                              route_scale=1.0, attention="gqa", n_heads=32, n_kv_heads=8,
                              rope_theta=1e6, norm_eps=1e-5),
    # DeepSeek-V3 in miniature: MLA, sigmoid gating, a shared expert, one dense block first
    "moe-debug": MoEConfig(vocab_size=256, seq_len=32, dim=64, n_layers=3, n_dense_layers=1, ffn_dim=128,
                           n_experts=8, top_k=2, n_shared=1, expert_dim=32, n_heads=4, q_lora_rank=32,
                           kv_lora_rank=16, qk_nope_dim=16, qk_rope_dim=8, v_head_dim=16),
}


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3), trained form (no cache compression)."""

    def __init__(self, c: MoEConfig):
        super().__init__()
        self.c, H = c, c.n_heads
        self.qk_dim = c.qk_nope_dim + c.qk_rope_dim
        self.wq_a, self.q_norm = nn.Linear(c.dim, c.q_lora_rank, bias=False), nn.RMSNorm(c.q_lora_rank, eps=c.norm_eps)
        self.wq_b = nn.Linear(c.q_lora_rank, H * self.qk_dim, bias=False)
        self.wkv_a = nn.Linear(c.dim, c.kv_lora_rank + c.qk_rope_dim, bias=False)
        self.kv_norm = nn.RMSNorm(c.kv_lora_rank, eps=c.norm_eps)
        self.wkv_b = nn.Linear(c.kv_lora_rank, H * (c.qk_nope_dim + c.v_head_dim), bias=False)
        self.wo = nn.Linear(H * c.v_head_dim, c.dim, bias=False)

    def forward(self, x, cos, sin):
        c, (B, T, _) = self.c, x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))).view(B, T, c.n_heads, self.qk_dim).transpose(1, 2)  # (B, nh, T, qk)
        q_nope, q_pe = q.split([c.qk_nope_dim, c.qk_rope_dim], dim=-1)
        kv, k_pe = self.wkv_a(x).split([c.kv_lora_rank, c.qk_rope_dim], dim=-1)  # (B, T, kv_lora), (B, T, rope)
        kv = self.wkv_b(self.kv_norm(kv)).view(B, T, c.n_heads, -1).transpose(1, 2)  # (B, nh, T, nope + v)
        k_nope, v = kv.split([c.qk_nope_dim, c.v_head_dim], dim=-1)
        k_pe = rotate(k_pe.unsqueeze(1), cos, sin).expand(-1, c.n_heads, -1, -1)  # (B, nh, T, rope), shared
        q = torch.cat([q_nope, rotate(q_pe, cos, sin)], dim=-1)  # (B, nh, T, qk)
        k = torch.cat([k_nope, k_pe], dim=-1)  # (B, nh, T, qk)
        # Flash-attention kernels want one head size for q, k and v, so v is zero-padded to the
        # query's (as DeepSeek-V3 training stacks do) and the padding dropped from the output.
        v = F.pad(v, (0, self.qk_dim - c.v_head_dim))  # (B, nh, T, qk)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)[..., :c.v_head_dim]  # (B, nh, T, v)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


_built: range | None = None  # the experts MoE layers build (None: all): see only_experts


@contextlib.contextmanager
def only_experts(keep: range | None):
    """MoE layers built meanwhile hold weights for the experts in `keep` only, the others an
    nn.Identity in their place. For a fake-tensor device under expert parallelism, which keeps its
    own experts and never initialises any: DeepSeek-V3 has 14,848 routed experts in all, and
    building each costs host time (minutes per device on a 2-core host)."""
    global _built
    before, _built = _built, keep
    try:
        yield
    finally:
        _built = before


class Experts(nn.ModuleList):
    """A layer's experts, called on their inputs together: a module FSDP2 can shard as one unit,
    whose forward gathers all its experts at once (plans.py). As Megatron-LM's GroupedMLP and
    torchtitan's GroupedExperts run them, each of the SwiGLU's three projections is one grouped
    GEMM over all the experts (kernels/moe_ops.py) and its activation one kernel over all rows;
    the values are those of calling each expert on its rows."""

    def forward(self, x, counts: list) -> torch.Tensor:  # (sum(counts), d) grouped by expert -> same
        if not all(isinstance(e, SwiGLU) for e in self):  # placeholders (only_experts), or other experts
            return torch.cat([expert(xe) for expert, xe in zip(self, x.split(counts))])
        w1, w2, w3 = ([getattr(e, w).weight for e in self] for w in ("w1", "w2", "w3"))
        h = moe_ops.swiglu(moe_ops.grouped_mm(x, w1, counts), moe_ops.grouped_mm(x, w3, counts), counts)  # (M, hidden)
        return moe_ops.grouped_mm(h, w2, counts)


class MoE(nn.Module):
    def __init__(self, c: MoEConfig, layer: int):
        super().__init__()
        self.c, self.layer = c, layer  # layer: this MoE layer's index among the model's MoE layers
        self.router = nn.Linear(c.dim, c.n_experts, bias=False)
        self.experts = Experts(SwiGLU(c.dim, c.expert_dim) if _built is None or e in _built else nn.Identity()
                               for e in range(c.n_experts))
        self.shared = SwiGLU(c.dim, c.n_shared * c.expert_dim) if c.n_shared else None
        self.routing = None  # None: count the real top-k choices; else a routing model (routing.py)
        self.counts: list[int] = []  # tokens each expert got in the last forward pass

    def forward(self, x):  # (B, T, d) -> (B, T, d)
        c, (B, T, d) = self.c, x.shape
        x = x.reshape(-1, d)  # (N, d) tokens
        logits = self.router(x)  # (N, E)
        if c.gate == "softmax":  # Mixtral: softmax over the k largest logits
            top, idx = logits.topk(c.top_k, dim=-1)  # (N, k)
            weights = top.softmax(dim=-1)
        else:  # DeepSeek-V3: sigmoid affinities, normalised over the chosen k
            top, idx = logits.sigmoid().topk(c.top_k, dim=-1)  # (N, k)
            weights = top / top.sum(dim=-1, keepdim=True) * c.route_scale
        y = self.dispatch(x, idx, weights)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(B, T, d)

    def dispatch(self, x, idx, weights):
        """Each token through its k experts, the (token, choice) pairs grouped per expert: the
        gather and the weighted combine as Megatron's fused permute and unpermute kernels."""
        k = self.c.top_k
        choice = idx.reshape(-1)  # (N k,) the expert of each (token, choice)
        order = choice.argsort(stable=True)  # (N k,) the choices grouped by expert
        counts = torch.zeros(self.c.n_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, choice, torch.ones_like(choice))  # (E,) choices per expert
        if self.routing is None:
            self.counts = counts.tolist()  # the data decides
        else:  # fake tensors carry no data: the routing model decides
            self.counts = self.routing.counts(self.layer, choice.numel(), self.c.n_experts, k)
        token = order // k  # (N k,) the token of each grouped choice
        grouped = moe_ops.permute(x, token)  # (N k, d) = x[token]: an all_to_all_single's input, split by self.counts
        out = self.experts(grouped, self.counts)  # (N k, d)
        # (N, d): each token's sum over its k outputs, weighted by the gate
        return moe_ops.unpermute(out, weights.reshape(-1)[order], token, x.shape[0])


class Block(nn.Module):
    """A pre-norm block: attention (MLA or GQA), then a feed-forward (dense SwiGLU or MoE)."""

    def __init__(self, c: MoEConfig, attn: nn.Module, ffn: nn.Module):
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.RMSNorm(c.dim, eps=c.norm_eps), nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.attn, self.ffn = attn, ffn

    def forward(self, x, cos, sin):  # x: (B, T, d)
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


def build(c: MoEConfig) -> llama.Transformer:
    def attention():
        return MLA(c) if c.attention == "mla" else llama.Attention(c.llama())

    blocks = [Block(c, attention(), SwiGLU(c.dim, c.ffn_dim) if i < c.n_dense_layers else
                    MoE(c, i - c.n_dense_layers)) for i in range(c.n_layers)]
    rope_dim = c.qk_rope_dim if c.attention == "mla" else c.dim // c.n_heads
    return llama.Transformer(c, blocks, rope_dim)


# workload(name, config=None), and the import paths BUILTINS names the configurations by
workload, __getattr__ = tokens.named(CONFIGS, build)
