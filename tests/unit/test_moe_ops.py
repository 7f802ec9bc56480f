"""The expert path as Megatron-LM and torchtitan run it (kernels/moe_ops.py, workloads/moe.py):
the local experts' projections as grouped GEMMs, the dispatch's gather and the weighted combine
as one kernel each. The values are those of the unfused code to the bit (losses on moe-debug
unchanged); what is charged is one kernel per grouped GEMM, not one per expert, and the
permutation's bytes once. No Ray."""

import dataclasses

import pytest
import torch
from torch.nn import functional as F

from relay.hardware.chips import get as get_chip
from relay.kernels import moe_ops
from relay.kernels.clock import VirtualLane
from relay.kernels.cost import CostModel
from relay.kernels.gemm import quantisation
from relay.kernels.throttle import Throttle
from relay.workloads import moe

H100 = get_chip("h100")
LAUNCH, BYTE_RATE = H100.launch_us / 1e6, H100.hbm_Bps * H100.mem_eff
FLOP_RATE = H100.peak_flops("bf16") * H100.matmul_eff


def unfused(layer: moe.MoE, x):
    """MoE.dispatch as it was written before the fused ops: per-expert calls, x[token], the
    weights multiplied, then index_add_ into zeros (the reference the fused ops must equal)."""
    c, (B, T, d) = layer.c, x.shape
    x = x.reshape(-1, d)
    top, idx = layer.router(x).sigmoid().topk(c.top_k, dim=-1)
    weights = top / top.sum(dim=-1, keepdim=True) * c.route_scale
    choice = idx.reshape(-1)
    order = choice.argsort(stable=True)
    counts = torch.bincount(choice, minlength=c.n_experts).tolist()
    token = order // c.top_k
    out = torch.cat([e(xe) for e, xe in zip(layer.experts, x[token].split(counts))])
    out = out * weights.reshape(-1)[order].unsqueeze(1)
    y = torch.zeros_like(x).index_add_(0, token, out) + layer.shared(x)
    return y.view(B, T, d)


def test_the_fused_expert_path_computes_the_unfused_values_to_the_bit():
    torch.manual_seed(0)
    layer = moe.MoE(moe.CONFIGS["moe-debug"], 0)
    x = torch.randn(2, 32, 64)
    outputs, grads = [], []
    for fn in (layer, lambda x: unfused(layer, x)):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.pow(2).sum().backward()
        outputs.append(y)
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    assert torch.equal(*outputs)
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert len(grads[0]) == 2 + 3 * 8 + 3  # input, router, 8 experts' 3 weights, the shared expert


def charged(fn, *args):
    lane = VirtualLane()
    with Throttle(CostModel(H100), lane) as t:
        out = fn(*args)
    return t, lane, out


def test_a_grouped_gemm_is_one_gemm_of_all_the_rows():
    counts, K, N = [300, 0, 212, 512], 256, 512  # an expert without tokens, too
    x, ws = torch.randn(sum(counts), K), [torch.randn(N, K) for _ in counts]
    t, lane, out = charged(moe_ops.grouped_mm, x, ws, counts)
    M = sum(counts)
    flops, nbytes = 2 * M * K * N, (M * K + len(ws) * N * K + M * N) * 2
    q = quantisation(M, N, H100.compute_units, 1, K)
    assert (t.ops, t.flops, t.bytes) == (1, flops, nbytes)  # one kernel, not one per expert
    assert lane.t == pytest.approx(LAUNCH + max(flops / q / FLOP_RATE, nbytes / BYTE_RATE), rel=1e-12)
    assert out.shape == (M, N)


def test_the_permutation_moves_its_bytes_once():
    x, index = torch.randn(100, 64), torch.randint(0, 100, (400,))
    t, lane, y = charged(moe_ops.permute, x, index)
    moved = (100 * 64 + 400 * 64) * 2 + 400 * 8  # read x, write its 400 rows (bf16); the int64 index
    assert (t.ops, t.bytes) == (1, moved)
    assert lane.t == pytest.approx(LAUNCH + moved / BYTE_RATE, rel=1e-12)
    probs = torch.rand(400)
    t, lane, _ = charged(moe_ops.unpermute, y, probs, index, 100)
    moved = (400 * 64 + 400 + 100 * 64) * 2 + 400 * 8  # weighted and summed in one kernel
    assert (t.ops, t.bytes) == (1, moved)


def test_the_expert_kernels_do_not_multiply_with_the_experts():
    """A MoE layer's forward and backward launch as many kernels with 8 experts as with 32
    (balanced routing on fake tensors, the same tokens): grouped GEMMs, one activation, the
    weight gradients written in place (the router's FLOPs grow with its outputs)."""
    from relay.device.fake.measure import step_cost
    from relay.workloads.moe import workload

    def kernels(n_experts):
        c = dataclasses.replace(moe.CONFIGS["moe-debug"], n_experts=n_experts)
        return step_cost(workload("moe-debug", c), 2, H100, optimizer_step=False)

    few, many = kernels(8), kernels(32)
    assert few.ops == many.ops
    router = 2 * 3 * (2 * 32) * 64 * (32 - 8) * 2  # fwd + 2 bwd GEMMs, 2 x 32 tokens, d 64, 2 MoE layers
    assert many.flops - few.flops == router


def test_experts_without_weights_fall_back_to_calling_each_and_odd_groups_keep_their_values():
    experts = moe.Experts([torch.nn.Identity(), torch.nn.Identity()])
    x = torch.randn(5, 4)
    assert torch.equal(experts(x, [2, 3]), x)
    # groups whose rows do not fill whole vectors (3 x 8 elements): still the per-expert values and gradients
    swiglu = moe.Experts([moe.SwiGLU(4, 8), moe.SwiGLU(4, 8)])
    got, want = [], []
    for fn, into in ((lambda: swiglu(x, [2, 3]), got),
                     (lambda: torch.cat([e.w2(F.silu(e.w1(xe)) * e.w3(xe)) for e, xe in zip(swiglu, x.split([2, 3]))]),
                      want)):
        swiglu.zero_grad()
        y = fn()
        y.sin().sum().backward()
        into += [y] + [p.grad.clone() for p in swiglu.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
