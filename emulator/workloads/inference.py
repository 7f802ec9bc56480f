"""Inference on the language models (llama.py, moe.py): a prefill of the prompts, then decode
steps of one token each against a KV cache, with the models' own weights and modules.

The KV cache is preallocated at the longest context (`Cache`), written in place at each step's
positions (the write is charged as the bytes of the new tokens, not the whole cache) and read
whole by every decode step's attention, as serving systems' paged caches are: the cost model
charges a decode step the full cache's HBM traffic because the attention kernel reads it.

Grouped-query attention (Llama 3, Mixtral) caches keys and values, 2 x n_kv_heads x head_dim per
token per layer. Multi-head latent attention (DeepSeek-V3) caches the compressed latent and the
shared rotary key, kv_lora_rank + qk_rope_dim (512 + 64) per token per layer, as DeepSeek's and
SGLang's inference code does: the prefill runs the trained form (keys and values decompressed
through wkv_b), the decode the absorbed form (wkv_b's key half folded into the query, its value
half applied after the attention), so that decode attends over the latent cache directly
(DeepSeek-V2, arXiv 2405.04434, section 2.1.3; FlashMLA).

`generate` (cached) and `reference` (the whole sequence recomputed by the model's own forward at
every token, no cache) must give the same greedy tokens: tests/unit/test_inference.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn import functional as F
from torch.utils.flop_counter import register_flop_formula

from relay.kernels import moe_ops
from relay.workloads.llama import Attention, SwiGLU, rotate
from relay.workloads.moe import MLA, Experts


@dataclass
class Cache:
    """Per block, the cached tensors (preallocated at `max_len` tokens), and the tokens written."""

    layers: list  # per block: (k, v) each (B, nkv, L, hs) for GQA; (B, L, kv_lora + rope) for MLA
    length: int = 0  # tokens cached so far


@torch.library.custom_op("relay_inference::mla_decode", mutates_args=())
def mla_decode(q: torch.Tensor, rows: torch.Tensor, kv_lora: int, scale: float) -> torch.Tensor:
    """MLA's absorbed decode attention as FlashMLA runs it, one kernel: queries q (B, M, C) (the
    heads folded into the rows) over the cache rows (B, L, C), C = kv_lora + rope, whose first
    kv_lora values are also the values: softmax(q rows^T x scale) rows[..., :kv_lora], (B, M, kv_lora).
    One op, so the cost model charges the rows read once (with the queries and the output)."""
    p = (torch.bmm(q, rows.transpose(1, 2)) * scale).softmax(dim=-1)  # (B, M, L)
    return torch.bmm(p, rows[..., :kv_lora])


@mla_decode.register_fake
def _(q, rows, kv_lora, scale):
    return q.new_empty(q.shape[0], q.shape[1], kv_lora)


@register_flop_formula(torch.ops.relay_inference.mla_decode)
def _mla_decode_flops(q_shape, rows_shape, kv_lora, scale, *args, out_shape=None, **kwargs) -> int:
    """The scores (C per query-row pair) and the weighted sum of the values (kv_lora per pair), 2 FLOPs a MAC."""
    (B, M, C), L = q_shape, rows_shape[1]
    return 2 * B * M * L * (C + kv_lora)


def cache_bytes_per_token(config, itemsize: int = 2) -> int:
    """Bytes the KV cache holds per token per layer at `itemsize` bytes an element (before tp)."""
    if getattr(config, "attention", "gqa") == "mla":
        return (config.kv_lora_rank + config.qk_rope_dim) * itemsize
    return 2 * config.n_kv_heads * (config.dim // config.n_heads) * itemsize


def new_cache(model, batch: int, max_len: int, dtype=None, device=None) -> Cache:
    """An empty cache for `model` (its attention modules as built, heads split or not)."""
    dtype = dtype or model.tok.weight.dtype
    device = device or model.tok.weight.device
    layers = []
    for block in model.blocks:
        a = block.attn
        if isinstance(a, MLA):
            # latent and rotary key side by side in one row per token, as FlashMLA's cache holds them
            layers.append(torch.zeros(batch, max_len, a.c.kv_lora_rank + a.c.qk_rope_dim, dtype=dtype, device=device))
        else:
            shape = (batch, a.n_kv_heads, max_len, a.head_dim)
            layers.append(tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(2)))
    return Cache(layers)


def _gqa(a: Attention, x, cos, sin, kv, start: int):
    B, T, _ = x.shape
    q = a.wq(x).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)  # (B, nh, T, hs)
    k = a.wk(x).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
    v = a.wv(x).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    kc, vc = kv
    kc[:, :, start:start + T] = k  # the new tokens written in place
    vc[:, :, start:start + T] = v
    end = start + T
    # a prefill (from position 0) is causal over its own tokens; a decode token sees the whole cache
    y = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], is_causal=start == 0 and T > 1,
                                       enable_gqa=True)  # (B, nh, T, hs)
    return a.wo(y.transpose(1, 2).reshape(B, T, -1))


def _mla(a: MLA, x, cos, sin, cache, start: int):
    c, (B, T, _) = a.c, x.shape
    q = a.wq_b(a.q_norm(a.wq_a(x))).view(B, T, c.n_heads, a.qk_dim).transpose(1, 2)  # (B, nh, T, qk)
    q_nope, q_pe = q.split([c.qk_nope_dim, c.qk_rope_dim], dim=-1)
    latent, k_pe = a.wkv_a(x).split([c.kv_lora_rank, c.qk_rope_dim], dim=-1)  # (B, T, kv_lora), (B, T, rope)
    latent = a.kv_norm(latent)
    k_pe = rotate(k_pe.unsqueeze(1), cos, sin).squeeze(1)  # (B, T, rope)
    end, q_pe = start + T, rotate(q_pe, cos, sin)
    cache[:, start:end] = torch.cat([latent, k_pe], dim=-1)  # the new tokens' rows written in place
    if start == 0 and T > 1:  # prefill: the trained form, keys and values decompressed
        kv = a.wkv_b(latent).view(B, T, c.n_heads, -1).transpose(1, 2)  # (B, nh, T, nope + v)
        k_nope, v = kv.split([c.qk_nope_dim, c.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, c.n_heads, -1, -1)], dim=-1)  # (B, nh, T, qk)
        v = F.pad(v, (0, a.qk_dim - c.v_head_dim))
        y = F.scaled_dot_product_attention(torch.cat([q_nope, q_pe], dim=-1), k, v, is_causal=True)
        y = y[..., :c.v_head_dim]  # (B, nh, T, v)
    else:  # decode: absorbed, attending over the cache rows (B, L, kv_lora + rope) themselves
        w = a.wkv_b.weight.view(c.n_heads, c.qk_nope_dim + c.v_head_dim, c.kv_lora_rank)
        w_uk, w_uv = w[:, :c.qk_nope_dim], w[:, c.qk_nope_dim:]  # (nh, nope, kv_lora), (nh, v, kv_lora)
        q_lat = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk)  # (B, nh, T, kv_lora)
        # One key/value head shared by every query head: the heads fold into the query rows (as
        # FlashMLA runs it), so one fused kernel reads the cache once and never copies it per head.
        q = torch.cat([q_lat, q_pe], dim=-1).reshape(B, -1, c.kv_lora_rank + c.qk_rope_dim)  # (B, nh T, 576)
        y_lat = mla_decode(q, cache[:, :end], c.kv_lora_rank, 1 / math.sqrt(a.qk_dim))  # (B, nh T, kv_lora)
        y = torch.einsum("bhtc,hvc->bhtv", y_lat.reshape(B, c.n_heads, T, c.kv_lora_rank), w_uv)  # (B, nh, T, v)
    return a.wo(y.transpose(1, 2).reshape(B, T, -1))


def attention(block, x, cos, sin, kv, start: int) -> torch.Tensor:
    """x plus the block's attention over its cache `kv` (the step's tokens written at `start`)."""
    h = block.attn_norm(x)
    h = _mla(block.attn, h, cos, sin, kv, start) if isinstance(block.attn, MLA) else \
        _gqa(block.attn, h, cos, sin, kv, start)
    return x + h


def rotary(model, cache: Cache, T: int, drafts: int = 0) -> tuple:
    """The rotary tables of a step of T tokens after the cache's (a prompt to an empty cache, then one
    token a step, or one and its `drafts` multi-token prediction drafts, verified together)."""
    start = cache.length
    if start and T != 1 + drafts:
        raise ValueError(f"{T} tokens fed after {start} cached ones with {drafts} draft(s): feed a prompt to an "
                         "empty cache, then one token a step (and its drafts, sampled, to verify them)")
    return model.cos[start:start + T], model.sin[start:start + T]


def forward(model, idx: torch.Tensor, cache: Cache, sample: int = 1) -> torch.Tensor:
    """Logits (B, vocab) of the last of `idx`'s tokens (B, T), fed after the cache's tokens: a
    prefill when the cache is empty, else T = 1, one decode step, or T = 2, a token and its
    multi-token prediction draft, verified together (sample = 2: logits (B, 2, vocab) of both; the
    two new tokens attend to the whole cache, the draft's own row included: the kernels' bytes and
    FLOPs are those of the masked step, its values are not sampled). The cache is advanced."""
    start, T = cache.length, idx.shape[1]
    cos, sin = rotary(model, cache, T, sample - 1)
    x = model.tok(idx)  # (B, T, d)
    for block, kv in zip(model.blocks, cache.layers):
        x = attention(block, x, cos, sin, kv, start)
        x = x + block.ffn(block.ffn_norm(x))
    cache.length = start + T
    logits = model.head(model.norm(x[:, -sample:]))  # only the sampled positions reach the head
    return logits[:, 0] if sample == 1 else logits


def balanced_splits(rows: int, n: int, rank: int) -> tuple[list[int], list[int]]:
    """Balanced routing of `rows` (token, expert) rows from each of n devices: the rows this device
    sends each peer and receives from each. When n does not divide rows, the remainder's extra
    rows go to the r peers after this device (a rotation), so every device sends and receives
    exactly `rows` and does the same work."""
    base, r = divmod(rows, n)
    send = [base + ((p - rank) % n < r) for p in range(n)]
    recv = [base + ((rank - p) % n < r) for p in range(n)]
    return send, recv


class EPShard(nn.Module):
    """One device's MoE layer under expert parallelism, as large-scale EP serving runs it: the
    router over all experts, the dispatch buffer of its tokens' top-k choices, its `local` experts
    on the rows it receives (tokens x top_k, balanced), the combine, and the replicated shared
    experts. With `group` (a process group of the ep devices) the dispatch and the combine are
    all-to-alls over it (balanced_splits); without, the rows stay on the device (the serving
    model's measured step: analytic/serving.py times the all-to-alls in closed form). In three
    stages (`start`, `experts`, `finish`), so that two micro-batches can overlap one's
    all-to-all with the other's compute (device/training/serving.py)."""

    def __init__(self, c, local: int, group=None, wire=None):
        super().__init__()
        self.c, self.group, self.wire = c, group, wire  # wire: the dtype fake rows travel in
        self.router = nn.Linear(c.dim, c.n_experts, bias=False)
        self.experts = Experts(SwiGLU(c.dim, c.expert_dim) for _ in range(local))
        self.shared = SwiGLU(c.dim, c.n_shared * c.expert_dim) if c.n_shared else None

    def forward(self, x):  # (B, T, d) -> (B, T, d)
        return self.finish(self.expert_rows(self.start(x)))

    def _all_to_all(self, rows: torch.Tensor, out_splits: list, in_splits: list):
        out = rows.new_empty(sum(out_splits), rows.shape[1])
        if self.wire is None or not isinstance(rows, FakeTensor) or rows.dtype == self.wire:
            return out, dist.all_to_all_single(out, rows, out_splits, in_splits, group=self.group, async_op=True)
        # fake rows hold no values: bare buffers of the wire's dtype travel in their place, so the
        # messages have the served size (the host's fp32 would double it), and no cast is charged
        sent, got = rows.new_empty(rows.shape, dtype=self.wire), out.new_empty(out.shape, dtype=self.wire)
        return out, dist.all_to_all_single(got, sent, out_splits, in_splits, group=self.group, async_op=True)

    def start(self, x) -> dict:
        """Routes x (B, T, d) and issues the dispatch of its rows."""
        s = {"shape": x.shape, "x": x.reshape(-1, x.shape[-1])}  # (N, d)
        top, idx = self.router(s["x"]).topk(self.c.top_k, dim=-1)  # (N, k)
        s["weights"] = top.softmax(-1).reshape(-1)
        s["token"] = torch.arange(s["x"].shape[0], device=x.device).repeat_interleave(self.c.top_k)  # (N k,)
        sent = moe_ops.permute(s["x"], s["token"])  # (N k, d): the dispatch's send buffer
        if self.group is None:
            s["rows"] = sent
        else:
            s["send"], s["recv"] = balanced_splits(sent.shape[0], dist.get_world_size(self.group),
                                                   dist.get_rank(self.group))
            s["rows"], s["work"] = self._all_to_all(sent, s["recv"], s["send"])
        return s

    def expert_rows(self, s: dict) -> dict:
        """The local experts on the rows received (balanced over them), the combine issued."""
        if "work" in s:
            s["work"].wait()
        rows, local = s["rows"].shape[0], len(self.experts)
        counts = [rows // local + (e < rows % local) for e in range(local)]  # balanced routing
        out = self.experts(s["rows"], counts)
        if self.group is None:
            s["back"] = out
        else:
            s["back"], s["work"] = self._all_to_all(out, s["send"], s["recv"])
        return s

    def finish(self, s: dict) -> torch.Tensor:
        """The combine's rows weighted back onto their tokens, plus the shared experts: (B, T, d)."""
        if "work" in s:
            s["work"].wait()
        y = moe_ops.unpermute(s["back"], s["weights"], s["token"], s["x"].shape[0])
        if self.shared is not None:
            y = y + self.shared(s["x"])
        return y.view(s["shape"])


@torch.no_grad()
def generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation (B, new_tokens) of `prompt` (B, T): one prefill, then cached decode steps."""
    B, T = prompt.shape
    cache = new_cache(model, B, T + new_tokens)
    out = [forward(model, prompt, cache).argmax(-1)]
    for _ in range(new_tokens - 1):
        out.append(forward(model, out[-1][:, None], cache).argmax(-1))
    return torch.stack(out, dim=1)


@torch.no_grad()
def reference(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The same continuation with no cache: the model's own forward over the whole sequence per token."""
    idx = prompt
    for _ in range(new_tokens):
        idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[:, prompt.shape[1]:]
