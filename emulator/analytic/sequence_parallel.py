"""Sequence parallelism in the measured blocks (footprint.measure): one device's block runs its
norms and residual adds on 1 / tp of the sequence, as plans.py, torchtitan (SequenceParallel on
the norms, RowwiseParallel to Shard(1)) and Megatron-LM (--sequence-parallel) run them; the
attention and the feed-forward, split by tp, see the whole sequence.

On fake tensors the gather before each of them and the scatter after are free (new_empty: no
kernel, no bytes): the all-gather and the reduce-scatter are tensor parallel's communication,
costed apart (tensor_parallel.py). What the wrapped model measures, beyond the split heads: the
memory-bound ops outside the tensor-parallel regions at a 1 / tp share, in every pass (forward,
backward, recompute), and what the block's two norms save at that share (norms inside the
attention, as MLA's on its latents, see the whole sequence). Not modelled: the FP8 cast of a
gathered input is charged on the whole sequence (Transformer Engine and torchao cast the shard
before gathering it in FP8); under fusion="fused" the shard's first and last ops are fresh
tensors, so the chains across a block's ends break (a launch or two a block: negligible at full
size, where sp still saves hundreds of microseconds a block).
"""

from __future__ import annotations

import torch
from torch import nn

from relay.errors import ConfigError


class _Gather(torch.autograd.Function):
    """(B, T / tp, ...) -> (B, T, ...) on fake tensors, free both ways."""

    @staticmethod
    def forward(ctx, x, tp: int):
        ctx.tp = tp
        return x.new_empty(x.shape[0], x.shape[1] * tp, *x.shape[2:])

    @staticmethod
    def backward(ctx, grad):
        return grad.new_empty(grad.shape[0], grad.shape[1] // ctx.tp, *grad.shape[2:]), None


class _Scatter(torch.autograd.Function):
    """(B, T, ...) -> (B, T / tp, ...) on fake tensors, free both ways."""

    @staticmethod
    def forward(ctx, x, tp: int):
        if x.shape[1] % tp:
            raise ConfigError(f"sequence parallel splits the sequence tp ways: seq_len = {x.shape[1]} is not a "
                              f"multiple of tp = {tp}; give a multiple of tp, or drop sp")
        ctx.tp = tp
        return x.new_empty(x.shape[0], x.shape[1] // tp, *x.shape[2:])

    @staticmethod
    def backward(ctx, grad):
        return grad.new_empty(grad.shape[0], grad.shape[1] * ctx.tp, *grad.shape[2:]), None


class _Region(nn.Module):
    """A tensor-parallel region (a block's attention or feed-forward): its input gathered, its
    output scattered back to the sequence's shard."""

    def __init__(self, inner: nn.Module, tp: int):
        super().__init__()
        self.inner, self.tp = inner, tp

    def forward(self, x, *args, **kwargs):
        return _Scatter.apply(self.inner(_Gather.apply(x, self.tp), *args, **kwargs), self.tp)


def shard_sequence(model: nn.Module, tp: int) -> nn.Module:
    """`model` (its blocks' attention `attn` and feed-forward `ffn` split by tp already; a fake-tensor
    model, whose blocks take the residual stream first and positionally) with the residual stream
    between its blocks on 1 / tp of the sequence: scattered before the first block, gathered after
    the last (so the embedding, final norm and head, measured without blocks, are unchanged)."""
    blocks = list(getattr(model, "blocks", []))
    if tp == 1 or not blocks:
        return model
    for block in blocks:
        block.attn, block.ffn = _Region(block.attn, tp), _Region(block.ffn, tp)
    blocks[0].register_forward_pre_hook(lambda _, args: (_Scatter.apply(args[0], tp), *args[1:]))
    blocks[-1].register_forward_hook(lambda _, args, out: _Gather.apply(out, tp))
    return model
