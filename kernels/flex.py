"""FlexAttention under the throttle: charged as one fused attention kernel, as on a GPU.

torch.nn.attention.flex_attention is a higher-order operator (flex_attention, and
flex_attention_backward for its gradient), not an aten op: a TorchDispatchMode sees it only where
a rule is registered for the mode's exact type, and otherwise the program stops ("no rule
registered for HigherOrderOperator flex_attention"). torchtitan's llama3 models use it by default.

On a GPU, flex_attention is compiled into one fused kernel (a flash-attention template); the
throttle charges it as the fused SDPA kernel of the same shapes (kernels/cost.py's formulas:
QK^T and PV, the full score matrix also under a causal block mask, as for SDPA's is_causal; the
backward's recompute of the scores charged as time, not model FLOPs), with the bytes of its
inputs and outputs. The operator itself runs below the throttle, as PyTorch runs it without
compiling (its dense reference implementation on host tensors, its fake implementation on fake
ones); the ops inside are not charged.
"""

from __future__ import annotations

import torch
from torch._higher_order_ops.flex_attention import flex_attention, flex_attention_backward

# the fused SDPA kernels whose formulas (kernels/cost.py ATTENTION_FLOPS, FUSED_BACKWARD) stand for
# flex_attention's compiled kernels: (query, key, value, ...) and (grad_out, query, key, value, ...)
FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
# A block mask's sparsity is data (its kv_num_blocks), which fake tensors do not hold: whether the
# compiled kernel skips half the square (a causal mask) is unknown, so the charge keeps the GEMM
# rule (kernels/attention.py: no implementation's table, which assume a known mask)
UNKNOWN_MASK = {"is_causal": None}


def _track(mode, out) -> None:
    memory = getattr(mode, "memory", None)  # the emulated HBM where the device counts it
    if memory is not None:
        memory.track(out)


def _forward(mode, query, key, value, score_mod, block_mask, scale, kernel_options,
             score_mod_other_buffers=(), mask_mod_other_buffers=()):
    out = flex_attention(query, key, value, score_mod, block_mask, scale, kernel_options,
                         score_mod_other_buffers, mask_mod_other_buffers)
    _track(mode, out)
    if not mode.paused:
        mode._charge(FORWARD, (query, key, value), UNKNOWN_MASK, out[0])
    return out


def _backward(mode, query, key, value, out, logsumexp, grad_out, grad_logsumexp, fw_graph, joint_graph,
              block_mask, scale, kernel_options, score_mod_other_buffers=(), mask_mod_other_buffers=()):
    grads = flex_attention_backward(query, key, value, out, logsumexp, grad_out, grad_logsumexp, fw_graph,
                                    joint_graph, block_mask, scale, kernel_options, score_mod_other_buffers,
                                    mask_mod_other_buffers)
    _track(mode, grads)
    if not mode.paused and grad_out is not None:
        mode._charge(BACKWARD, (grad_out, query, key, value, out, logsumexp), UNKNOWN_MASK, tuple(grads[:3]))
    return grads


def register(mode_type: type) -> None:
    """Rules for both operators under `mode_type` (torch looks rules up by the mode's exact type:
    the throttle registers itself and each of its subclasses)."""
    for op, rule in ((flex_attention, _forward), (flex_attention_backward, _backward)):
        if mode_type not in op.python_key_table:
            op.py_impl(mode_type)(rule)


def host_patches() -> list:
    """(object, name, value) patches for a virtual CUDA device, whose "cuda" tensors are host tensors:
    * flex_attention refuses gradients on CPU tensors (torch's CPU kernels are inference only);
      here the operator runs its dense implementation, which has a backward. Its other checks stay.
    * without torch.compile, flex_attention traces its operator with Dynamo (backend "eager"), which
      with the throttle on the mode stack traces into the throttle itself and stops; the operator is
      called directly instead (torch's own debug path: _FLEX_ATTENTION_DISABLE_COMPILE_DEBUG), the
      same operator with the same autograd rule."""
    import torch.nn.attention.flex_attention as api
    original = api._validate_device

    def _validate_device(query, key, value):
        if query.device.type == "cpu":
            return None
        return original(query, key, value)
    return [(api, "_validate_device", _validate_device), (api, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)]
