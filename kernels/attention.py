"""Fused attention kernels as a GPU runs them: how much of the chip's dense peak each
implementation reaches, and the half of a causal score matrix it skips.

    seconds = executed FLOPs / (peak x efficiency[chip][implementation][direction])
    executed = the kernel's FLOPs (torch's formulas: QK^T and PV over the full score matrix; the
               backward's recompute of the scores included), halved under a causal mask

A flash-style kernel walks the score matrix in tiles and skips the tiles a causal mask removes
entirely, so it executes about half of what torch's formulas count. FlashAttention's own
benchmarks count causal FLOPs as half (flash-attention benchmarks/benchmark_flash_attention.py,
`flops(..., causal)`) and report TFLOPS in that count: the efficiencies of `catalog.toml`'s
`attention` tables are those TFLOPS over the chip's dense BF16 peak, so they already hold the
diagonal tiles' waste. The model's FLOPs (MFU) keep torch's count: only the time changes.

Implementations (what a framework's attention calls on the chip):
    sdpa    PyTorch's scaled_dot_product_attention, flash backend: FlashAttention-2 kernels
            vendored into PyTorch (what eager PyTorch, torch.compile and torchtitan run)
    cudnn   cuDNN's fused attention (Transformer Engine's FusedAttention backend: what Megatron-Core
            and NeMo run on Hopper)
A chip without an `attention` table in the catalog keeps the GEMM rule (the chip's matmul_eff
over the full score matrix): no sourced kernel figure exists for it.
"""

from __future__ import annotations

import torch

IMPLEMENTATIONS = ("sdpa", "cudnn")
DEFAULT = "sdpa"  # what a PyTorch program's F.scaled_dot_product_attention runs

_aten = torch.ops.aten
# attention kernels (forward, backward) whose argument `is_causal` (the efficient kernels': `custom_mask_type`)
# says whether the mask is causal
FORWARD = {_aten._scaled_dot_product_flash_attention_for_cpu, _aten._scaled_dot_product_flash_attention,
           _aten._scaled_dot_product_efficient_attention, _aten._scaled_dot_product_cudnn_attention,
           _aten._scaled_dot_product_fused_attention_overrideable, _aten._flash_attention_forward,
           _aten._efficient_attention_forward}
BACKWARD = {_aten._scaled_dot_product_flash_attention_for_cpu_backward,
            _aten._scaled_dot_product_flash_attention_backward,
            _aten._scaled_dot_product_efficient_attention_backward,
            _aten._scaled_dot_product_cudnn_attention_backward,
            _aten._scaled_dot_product_fused_attention_overrideable_backward,
            _aten._flash_attention_backward, _aten._efficient_attention_backward}
_CAUSAL_ARG: dict = {}  # op -> (position, name) of its is_causal or custom_mask_type argument (None: none)


def check(implementation) -> None:
    """A ValueError for an attention implementation the cost model lacks."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention = {implementation!r} is unknown; choose one of {', '.join(IMPLEMENTATIONS)} "
                         "('sdpa': PyTorch's flash backend, FlashAttention-2; 'cudnn': cuDNN / Transformer Engine)")


def causal(func, args, kwargs) -> bool | None:
    """Whether an attention kernel's call masks causally (its is_causal argument, or the efficient
    kernels' custom_mask_type: 0 none, 1 and 2 causal); None: unknown (a FlexAttention block mask,
    kernels/flex.py)."""
    try:
        i, name = _CAUSAL_ARG[func]
    except KeyError:
        names = [a.name for a in func._schema.arguments]
        name = next((n for n in ("is_causal", "custom_mask_type") if n in names), None)
        i, name = _CAUSAL_ARG[func] = (names.index(name) if name else None), name
    if i is None:
        return False
    if kwargs and name in kwargs:
        return None if kwargs[name] is None else bool(kwargs[name])
    return bool(args[i]) if len(args) > i else False


def rate(chip, implementation: str, backward: bool, is_causal: bool | None) -> float | None:
    """The fraction of `chip`'s dense peak the kernel reaches in the FLOPs it executes, divided by
    the share of torch's count it executes (1/2 under a causal mask): the factor that turns torch's
    count into the kernel's time at the chip's peak; None for a chip without a sourced table, or a
    mask not known (the GEMM rule then)."""
    table = getattr(chip, "attention", None) or {}
    if is_causal is None:
        return None
    effs = table.get(implementation)
    if not effs:
        return None
    eff = effs[2 * bool(is_causal) + bool(backward)]  # [forward, backward, causal forward, causal backward]
    return eff / (0.5 if is_causal else 1.0)


def words(chip, implementation: str) -> str:
    """What a header says of the attention charged: the implementation where the chip has its
    table, else the GEMM rule that is charged instead."""
    if implementation in (getattr(chip, "attention", None) or {}):
        return f"{implementation} attention"
    return f"attention at the GEMM rule ({chip.name} has no {implementation} table)"
