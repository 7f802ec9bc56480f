"""Attention is charged its FLOPs whichever kernel PyTorch dispatches F.scaled_dot_product_attention
to (on this CPU host: aten._scaled_dot_product_flash_attention_for_cpu and its backward, which
torch.utils.flop_counter has no formula for)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relay import chips
from relay.kernels.clock import VirtualLane
from relay.kernels.cost import CostModel
from relay.kernels.throttle import Throttle

B, H, T, D = 2, 4, 32, 16


class Attention(nn.Module):
    def __init__(self, sdpa: bool, causal: bool):
        super().__init__()
        self.qkv, self.sdpa, self.causal = nn.Linear(H * D, 3 * H * D), sdpa, causal

    def forward(self, x):  # (B, T, H*D)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in self.qkv(x).split(H * D, dim=-1))  # (B, H, T, D)
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, T)
        if self.causal:
            att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        return att.softmax(dim=-1) @ v


def charged(sdpa: bool, causal: bool, backward: bool):
    torch.manual_seed(0)
    model, x = Attention(sdpa, causal), torch.randn(B, T, H * D)
    with Throttle(CostModel(chips.get("h100")), VirtualLane()) as t:
        out = model(x)
        forward = t.flops
        if backward:
            out.sum().backward()
    return forward, t.flops, out


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_is_charged_the_flops_of_explicit_attention(causal):
    f_sdpa, fb_sdpa, out_sdpa = charged(True, causal, True)
    f_explicit, fb_explicit, out_explicit = charged(False, causal, True)
    torch.testing.assert_close(out_sdpa, out_explicit, atol=1e-5, rtol=1e-5)  # the same model
    # forward: identical counts (QK^T and PV, the full score matrix also when causal)
    assert f_sdpa == f_explicit
    # backward: the fused kernel recomputes QK^T (torch's sdpa_backward_flop_count counts it), which
    # the explicit version kept from its forward; the model's FLOPs are the same either way
    assert fb_sdpa == fb_explicit
    assert f_sdpa > 2 * (2 * B * H * T * T * D)  # attention's matmuls are in it (main charged them 0 on CPU)


def test_the_fused_backwards_recompute_is_charged_as_time_not_flops():
    """At a compute-bound size: model FLOPs four products (2 s^2 d each per head), time five (on a
    chip without an attention table, at the GEMM rate: tests/unit/test_attention_kernels.py has the
    kernels' own rates)."""
    b, h, t, d = 8, 32, 4096, 128
    q, k, v, g = (torch.empty(b, h, t, d, device="meta") for _ in range(4))
    model = CostModel(chips.get("mi300x"))  # (no attention table)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    flops, nbytes, _, rate = model.op_parts(op, (g, q, k, v))
    product = 2 * b * h * t * t * d
    assert flops == 4 * product
    assert model.op_cost(op, (g, q, k, v)).seconds == pytest.approx(model.seconds(5 * product, nbytes), rel=1e-12)
    assert 5 * product / model.chip.peak_flops("bf16") > nbytes / model.chip.hbm_Bps  # compute-bound: time shows it


def test_every_attention_kernel_torch_has_gets_a_formula():
    from torch.utils.flop_counter import flop_registry

    from relay.kernels.cost import ATTENTION_FLOPS
    names = [n for n in dir(torch.ops.aten) if "attention" in n and not n.startswith("_native")
             and ("scaled_dot_product" in n or n.startswith(("_flash_attention", "_efficient_attention")))]
    # the math fallback decomposes into matmuls and softmax; the public op is composite: it dispatches to
    # one of the kernels here (dir() lists it only once some test has touched it, e.g. torchao's import)
    math_fallback = {"_scaled_dot_product_attention_math", "scaled_dot_product_attention"}
    known = lambda n: getattr(torch.ops.aten, n) in flop_registry or getattr(torch.ops.aten, n) in ATTENTION_FLOPS
    missing = [n for n in names if n not in math_fallback and not known(n)]
    assert not missing, missing
