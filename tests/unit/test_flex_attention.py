"""FlexAttention (a higher-order operator, torchtitan's default attention) runs under the throttle
and is charged as the fused SDPA kernel of the same shapes, forward and backward (kernels/flex.py)."""

import contextlib

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from relay import chips
from relay.kernels import flex
from relay.kernels.clock import VirtualLane
from relay.kernels.cost import CostModel
from relay.kernels.throttle import Throttle

B, H, KV, T, D = 2, 4, 2, 128, 16


def _causal(b, h, q, kv):
    return q >= kv


@contextlib.contextmanager
def _host_backward():
    patches = flex.host_patches()
    saved = [getattr(obj, name) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for (obj, name, _), value in zip(patches, saved):
            setattr(obj, name, value)


def _qkv(heads_kv=H):
    torch.manual_seed(0)
    return (torch.randn(B, H, T, D, requires_grad=True), torch.randn(B, heads_kv, T, D, requires_grad=True),
            torch.randn(B, heads_kv, T, D, requires_grad=True))


def _run(attend, heads_kv=H):
    q, k, v = _qkv(heads_kv)
    with Throttle(CostModel(chips.get("h100")), VirtualLane()) as t:
        out = attend(q, k, v)
        forward = (t.ops, t.flops, t.bytes)
        out.sum().backward()
    return forward, (t.ops, t.flops, t.bytes), out, (q.grad, k.grad, v.grad)


def test_flex_attention_is_charged_as_the_fused_sdpa_kernel():
    mask = create_block_mask(_causal, None, None, T, T, device="cpu")
    with _host_backward():
        f_flex, fb_flex, out_flex, g_flex = _run(lambda q, k, v: flex_attention(q, k, v, block_mask=mask))
    f_sdpa, fb_sdpa, out_sdpa, g_sdpa = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    torch.testing.assert_close(out_flex, out_sdpa, atol=1e-5, rtol=1e-5)  # the same attention
    for a, b in zip(g_flex, g_sdpa):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # the fused kernel's FLOPs each way, not the dense implementation's matmuls on top
    assert f_flex[1] == f_sdpa[1] == 4 * B * H * T * T * D
    assert fb_flex[1] - f_flex[1] == fb_sdpa[1] - f_sdpa[1]


def test_grouped_query_flex_attention_and_fake_tensors():
    """GQA (torchtitan's 8B: fewer key/value heads) and fake tensors (relay launch --tensors fake)."""
    mask = create_block_mask(_causal, None, None, T, T, device="cpu")
    with _host_backward():
        f, fb, out, grads = _run(lambda q, k, v: flex_attention(q, k, v, block_mask=mask, enable_gqa=True), KV)
    assert f[1] == 4 * B * H * T * T * D and fb[1] > 2 * f[1]
    assert grads[1].shape == (B, KV, T, D)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with _host_backward(), fake, Throttle(CostModel(chips.get("h100")), VirtualLane()) as t:
        q, k, v = (torch.empty(B, H, T, D) for _ in range(3))
        out = flex_attention(q, k, v, block_mask=mask)
    assert out.shape == (B, H, T, D) and t.flops == 4 * B * H * T * T * D


def test_without_the_patch_flex_refuses_host_gradients():
    """The refusal the virtual CUDA device lifts (its tensors are host tensors)."""
    q, k, v = _qkv()
    try:
        flex_attention(q, k, v)
    except NotImplementedError as e:
        assert "backward on CPU" in str(e)
    else:
        raise AssertionError("torch's flex_attention takes CPU gradients now: drop kernels/flex.host_patches' first")
