"""Activation checkpointing of a model's blocks, as torchtitan applies it (Parallel's `ac`):

* full: every block keeps only its input and reruns its forward in backward;
* layer:N (selective, layer level): every Nth block of the device (the Nth, 2Nth, ... counted
  from 1, as torchtitan's `_apply_layer_sac` counts the blocks it wraps) fully recomputed, the
  others keep everything;
* op (selective, op level): inside each block, the outputs of the ops in SAVE are kept, except
  every second matrix multiply of the block (its 2nd, 4th, ...), and the rest recomputed.

torchtitan's op policy (torchtitan/models/llama3/infra/parallelize.py, `_save_list` and
`_get_custom_policy`, as of 2025; https://github.com/pytorch/torchtitan): save mm (every other
one), the SDPA kernels, the functional reduce-scatter and max. The CPU's SDPA kernel, which fake
and real runs on this host dispatch, stands in for flash attention.

The same rule (`saves`) decides what the runs keep (device/training/plans.py, through
torch.utils.checkpoint's selective contexts) and what the analytic model counts
(device/fake/measure.py: the saved ops' outputs and forward seconds of a block).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

aten = torch.ops.aten
MM = aten.mm.default
SAVE = {
    MM,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,  # the host's kernel of the same op
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    aten.max.default,
}


def saves(func, mm_seen: int) -> bool:
    """Whether the op policy keeps `func`'s output, `mm_seen` the block's matrix multiplies so far
    including this one (the odd ones are kept)."""
    return func in SAVE and not (func == MM and mm_seen % 2 == 0)


def recomputed(plan, index: int) -> str:
    """How block `index` (0-based, among the device's blocks) is checkpointed under `plan`:
    "none", "full" or "op"."""
    mode = plan.ac_mode
    if mode == "layer":
        return "full" if (index + 1) % plan.ac_every == 0 else "none"
    return mode


def apply(blocks, plan) -> None:
    """Each block's forward under torch.utils.checkpoint (non-reentrant) as `plan.ac` asks."""
    for i, block in enumerate(blocks):
        how = recomputed(plan, i)
        if how != "none":
            block.forward = _Checkpointed(block.forward, selective=how == "op")


def _op_contexts():
    """torchtitan's selective contexts for one block's forward: a fresh count of matrix multiplies
    for the forward and for the recompute."""
    seen = {"forward": 0, "recompute": 0}

    def policy(ctx, func, *args, **kwargs):
        mode = "recompute" if ctx.is_recompute else "forward"
        seen[mode] += func == MM
        return CheckpointPolicy.MUST_SAVE if saves(func, seen[mode]) else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


class _Checkpointed:
    def __init__(self, forward, selective: bool):
        self.forward, self.selective = forward, selective

    def __call__(self, *args):
        if self.selective:
            return checkpoint(self.forward, *args, use_reentrant=False, context_fn=_op_contexts)
        return checkpoint(self.forward, *args, use_reentrant=False)
