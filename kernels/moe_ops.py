"""The expert path's kernels as Megatron-LM and torchtitan run them, as torch custom ops, so that
the throttle sees (and the cost model charges) one kernel where a GPU runs one:

    grouped_mm(x, weights, counts)     x's rows, grouped by expert (counts), each group times its
                                       expert's weight^T: one grouped GEMM over all local experts
                                       (torch._grouped_mm in torchtitan, Megatron's GroupedMLP /
                                       TEGroupedLinear), where per-expert nn.Linear calls launch
                                       one GEMM per expert; its backward is two more grouped GEMMs
                                       (the input gradient, and the weight gradients, grouped on
                                       the reduction: `grouped_mm_dx`, `grouped_mm_dw`)
    permute(x, index)                  x[index]: the dispatch's gather of each (token, choice)
                                       into its expert's group (Megatron's fused moe_permute)
    swiglu(gate, up, counts)           silu(gate) * up, the experts' activation, in one kernel
    unpermute(y, probs, index, rows)   zeros(rows, d).index_add_(0, index, y * probs[:, None]):
                                       the combine, weighted by the router's probabilities, in
                                       one kernel (Megatron's fused moe_unpermute with probs)

Each runs, on real tensors, the very aten ops the unfused code ran, in the same order, so the
values are the same to the bit; what changes is what is charged: one op (a launch, its FLOPs,
its inputs and outputs once) instead of one per expert and per elementwise step. The cost model
charges a grouped GEMM as one GEMM of all the rows (kernels/cost.py: its FLOPs below, its tile
and wave quantisation over the whole output) at the chip's dense GEMM efficiency: an estimate,
from DeepGEMM's published contiguous-layout grouped GEMMs reaching the TFLOPS of its dense ones
at DeepSeek-V3's shapes (github.com/deepseek-ai/DeepGEMM, README performance tables).
Under the "fp8" precision they stay BF16: torchao's float8 Linear converter swaps nn.Linear
only (its MoE grouped-GEMM recipe is a separate prototype Relay does not model).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

_LIB = "relay"


@torch.library.custom_op(f"{_LIB}::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, weights: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """(M, K) rows grouped by counts, group e times weights[e]^T ((N, K) each): (M, N)."""
    return torch.cat([torch.mm(xe, w.t()) for xe, w in zip(x.split(counts), weights)])


@torch.library.custom_op(f"{_LIB}::grouped_mm_dx", mutates_args=())
def grouped_mm_dx(grad: torch.Tensor, weights: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """The input gradient of grouped_mm: group e of grad ((M, N)) times weights[e]: (M, K)."""
    return torch.cat([ge.mm(w) for ge, w in zip(grad.split(counts), weights)])


@torch.library.custom_op(f"{_LIB}::grouped_mm_dw", mutates_args=())
def grouped_mm_dw(grad: torch.Tensor, x: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """The weight gradients of grouped_mm: per group, (x_e^T grad_e)^T, each (N, K), written
    contiguous (as a grouped GEMM writes them: autograd takes them as they are, where a
    transposed view costs a copy per weight)."""
    return [xe.t().mm(ge).t().contiguous() for ge, xe in zip(grad.split(counts), x.split(counts))]


@grouped_mm.register_fake
def _(x, weights, counts):
    return x.new_empty(x.shape[0], weights[0].shape[0])


@grouped_mm_dx.register_fake
def _(grad, weights, counts):
    return grad.new_empty(grad.shape[0], weights[0].shape[1])


@grouped_mm_dw.register_fake
def _(grad, x, counts):
    return [grad.new_empty(grad.shape[1], x.shape[1]) for _ in counts]


def _grouped_setup(ctx, inputs, output):
    x, weights, counts = inputs
    ctx.save_for_backward(x, *weights)
    ctx.counts = counts


def _grouped_backward(ctx, grad):
    x, *weights = ctx.saved_tensors
    dx = grouped_mm_dx(grad, weights, ctx.counts) if ctx.needs_input_grad[0] else None
    dw = grouped_mm_dw(grad, x, ctx.counts) if ctx.needs_input_grad[1] else None
    return dx, dw, None


grouped_mm.register_autograd(_grouped_backward, setup_context=_grouped_setup)


@torch.library.custom_op(f"{_LIB}::swiglu", mutates_args=())
def swiglu(gate: torch.Tensor, up: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """silu(gate) * up over every group's rows in one kernel (Megatron's fused SwiGLU; each group
    computed on its own rows, as the per-expert code did, so the values match it to the bit)."""
    return torch.cat([F.silu(g) * u for g, u in zip(gate.split(counts), up.split(counts))])


@torch.library.custom_op(f"{_LIB}::swiglu_backward", mutates_args=())
def swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    # autograd's backward of the per-expert ops: the product's factors grad * the other, then silu's
    d_gate, d_up = [], []
    for g, h, u in zip(grad.split(counts), gate.split(counts), up.split(counts)):
        d_up.append(g * F.silu(h))
        d_gate.append(torch.ops.aten.silu_backward(g * u, h))
    return torch.cat(d_gate), torch.cat(d_up)


@swiglu.register_fake
def _(gate, up, counts):
    return torch.empty_like(gate)


@swiglu_backward.register_fake
def _(grad, gate, up, counts):
    return torch.empty_like(gate), torch.empty_like(up)


def _swiglu_setup(ctx, inputs, output):
    gate, up, counts = inputs
    ctx.save_for_backward(gate, up)
    ctx.counts = counts


def _swiglu_backward(ctx, grad):
    gate, up = ctx.saved_tensors
    return *swiglu_backward(grad, gate, up, ctx.counts), None


swiglu.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


@torch.library.custom_op(f"{_LIB}::permute", mutates_args=())
def permute(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x[index]


@torch.library.custom_op(f"{_LIB}::permute_backward", mutates_args=())
def permute_backward(grad: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    # autograd's own backward of x[index] (index_backward: an accumulating index_put into zeros)
    return grad.new_zeros((rows, *grad.shape[1:])).index_put_((index,), grad, accumulate=True)


@permute.register_fake
def _(x, index):
    return x.new_empty(index.shape[0], *x.shape[1:])


@permute_backward.register_fake
def _(grad, index, rows):
    return grad.new_empty(rows, *grad.shape[1:])


def _permute_setup(ctx, inputs, output):
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.rows = x.shape[0]


def _permute_backward(ctx, grad):
    index, = ctx.saved_tensors
    return permute_backward(grad, index, ctx.rows), None


permute.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op(f"{_LIB}::unpermute", mutates_args=())
def unpermute(y: torch.Tensor, probs: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    return y.new_zeros((rows, y.shape[1])).index_add_(0, index, y * probs.unsqueeze(1))


@torch.library.custom_op(f"{_LIB}::unpermute_backward", mutates_args=())
def unpermute_backward(grad: torch.Tensor, y: torch.Tensor, probs: torch.Tensor,
                       index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # autograd's backward of the unfused ops: index_add_'s source gets grad.index_select, the
    # product's factors grad * the other, the probabilities' summed back to their (M, 1) shape
    g = grad.index_select(0, index)
    return g * probs.unsqueeze(1), (g * y).sum([1], keepdim=True).squeeze(1)


@unpermute.register_fake
def _(y, probs, index, rows):
    return y.new_empty(rows, y.shape[1])


@unpermute_backward.register_fake
def _(grad, y, probs, index):
    return torch.empty_like(y), torch.empty_like(probs)


def _unpermute_setup(ctx, inputs, output):
    y, probs, index, _ = inputs
    ctx.save_for_backward(y, probs, index)


def _unpermute_backward(ctx, grad):
    y, probs, index = ctx.saved_tensors
    dy, dprobs = unpermute_backward(grad, y, probs, index)
    return dy, dprobs, None, None


unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)

_ops = torch.ops.relay
GROUPED_GEMMS = {_ops.grouped_mm, _ops.grouped_mm_dx}  # one output of all the groups' rows
GROUPED_GEMMS_FORWARD = _ops.grouped_mm  # (x, weights, counts): the forward's, whose weights a server may store in FP8
GROUPED_DW = _ops.grouped_mm_dw  # one output per group


def _grouped_flops(x, weights, counts, *args, out_val=None, **kwargs) -> int:
    # grouped_mm and grouped_mm_dx alike: every row of x times a (K, N) or (N, K) matrix
    n = out_val.shape[-1] if out_val is not None else weights[0].shape[0]
    return 2 * x.shape[0] * x.shape[1] * n


def _grouped_dw_flops(grad, x, counts, *args, out_val=None, **kwargs) -> int:
    return 2 * grad.shape[0] * grad.shape[1] * x.shape[1]


FLOPS = {_ops.grouped_mm: _grouped_flops, _ops.grouped_mm_dx: _grouped_flops, _ops.grouped_mm_dw: _grouped_dw_flops}
