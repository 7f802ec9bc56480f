"""Fused attention kernels at their own efficiency (kernels/attention.py): a causal kernel charged
half the score matrix at the implementation's published rate, by hand; the implementations and
chips without a table; the same charge in a training step, the plan model and the rows of
`relay validate --training`; bad values refused."""

import pytest
import torch

from relay import System, chips
from relay.analytic import planner
from relay.analytic.footprint import config_of, measure
from relay.errors import ConfigError
from relay.hardware.chips import Chip
from relay.kernels import flex
from relay.kernels.cost import CostModel
from relay.launch import validate_training as vt
from relay.launch.cli import main
from relay.launch.training_frameworks import attention_of
from relay.parallel import Parallel

H100, A100 = chips.get("h100"), chips.get("a100")
FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
B, H, T, D = 2, 32, 8192, 128  # a Llama 3 8B layer's attention at two 8,192-token samples: compute-bound
PRODUCT = 2 * B * H * T * T * D  # FLOPs of one s x s x d product over all heads (torch's count: full square)


def _tensors(n):
    return tuple(torch.empty(B, H, T, D, device="meta") for _ in range(n))


def _forward(model, causal):
    q, k, v, out = _tensors(4)
    return model.op_cost(FWD, (q, k, v, 0.0, causal), None, (out, torch.empty(B, H, T, device="meta")))


def _backward(model, causal):
    g, q, k, v, out = _tensors(5)
    lse = torch.empty(B, H, T, device="meta")
    return model.op_cost(BWD, (g, q, k, v, out, lse, 0.0, causal), None, _tensors(3))


def test_a_causal_flash_kernel_is_charged_half_the_square_at_its_published_rate():
    """By hand, from the catalog's table (the FlashAttention-3 paper's FlashAttention-2 figures on
    H100): forward 2 products, backward 5 (its recompute of the scores included), each halved by
    the causal mask, at the implementation's fraction of the BF16 peak. The model FLOPs keep
    torch's count (2 and 4 products)."""
    model, peak = CostModel(H100), H100.peak_flops("bf16")
    fwd_eff, bwd_eff, causal_fwd_eff, causal_bwd_eff = H100.attention["sdpa"]
    launch = H100.launch_us / 1e6
    fwd, bwd = _forward(model, True), _backward(model, True)
    assert (fwd.flops, bwd.flops) == (2 * PRODUCT, 4 * PRODUCT)
    assert fwd.seconds == pytest.approx(launch + 0.5 * 2 * PRODUCT / (peak * causal_fwd_eff), rel=1e-12)
    assert bwd.seconds == pytest.approx(launch + 0.5 * 5 * PRODUCT / (peak * causal_bwd_eff), rel=1e-12)
    # without the mask: the whole square at the non-causal rate
    assert _forward(model, False).seconds == pytest.approx(launch + 2 * PRODUCT / (peak * fwd_eff), rel=1e-12)
    assert _backward(model, False).seconds == pytest.approx(launch + 5 * PRODUCT / (peak * bwd_eff), rel=1e-12)
    # FlashAttention-2 on H100 reaches about a third of the peak: slower than the GEMM rule (0.85 of
    # the peak over the full square) although it skips half of it
    gemm_rule = 2 * PRODUCT / (peak * H100.matmul_eff)
    assert gemm_rule < fwd.seconds < 2 * gemm_rule


def test_the_a100_flash_table_is_its_measured_forward_and_an_estimated_backward():
    """A100's sdpa (FlashAttention-2) table, by hand from its source: the measured forward and causal
    forward (184.04 and 156.27 TFLOPS of 312), and backwards at FlashAttention-2's backward / forward
    ratio on H100 (318 / 370: the FlashAttention-3 paper). A causal 8K forward runs half the square at
    that rate: 1.78x the time the GEMM rule's rate would give the same half (0.89x what the GEMM rule
    charged before the table, the whole square)."""
    fwd, bwd, causal_fwd, causal_bwd = A100.attention["sdpa"]
    assert (fwd, causal_fwd) == (pytest.approx(184.04 / 312, abs=1e-4), pytest.approx(156.27 / 312, abs=1e-4))
    assert (bwd, causal_bwd) == (pytest.approx(fwd * 318 / 370, abs=1e-4), pytest.approx(causal_fwd * 318 / 370,
                                                                                          abs=1e-4))
    assert "liangan1/GPU_travel" in A100.sources["attention"] and "estimate" in A100.sources["attention"]
    model, peak, launch = CostModel(A100), A100.peak_flops("bf16"), A100.launch_us / 1e6
    assert _forward(model, True).seconds == pytest.approx(launch + PRODUCT / (peak * causal_fwd), rel=1e-12)
    half = PRODUCT / (peak * A100.matmul_eff)  # the causal half at the GEMM rule's rate
    assert _forward(model, True).seconds - launch == pytest.approx(1.78 * half, abs=0.01 * half)


def test_cudnn_is_charged_at_its_own_rate_and_a_chip_without_a_table_keeps_the_gemm_rule():
    sdpa, cudnn = CostModel(H100), CostModel(H100, attention="cudnn")
    for causal in (True, False):
        for charge, i in ((_forward, 0), (_backward, 1)):
            i += 2 * causal
            ratio = H100.attention["cudnn"][i] / H100.attention["sdpa"][i]
            s, c = charge(sdpa, causal).seconds, charge(cudnn, causal).seconds
            launch = H100.launch_us / 1e6
            assert (s - launch) / (c - launch) == pytest.approx(ratio, rel=1e-12)
    # a FlexAttention block mask (kernels/flex.py), whose sparsity fake tensors do not hold: the GEMM rule
    q, k, v, out = _tensors(4)
    launch, rate = H100.launch_us / 1e6, H100.peak_flops("bf16") * H100.matmul_eff
    assert sdpa.op_cost(FWD, (q, k, v), flex.UNKNOWN_MASK, out).seconds == pytest.approx(launch + 2 * PRODUCT / rate,
                                                                                           rel=1e-12)
    a100 = CostModel(A100, attention="cudnn")  # no cudnn table for A100: matmul_eff over torch's full count
    rate = A100.peak_flops("bf16") * A100.matmul_eff
    assert _forward(a100, True).seconds == pytest.approx(A100.launch_us / 1e6 + 2 * PRODUCT / rate, rel=1e-12)
    assert _backward(a100, True).seconds == pytest.approx(A100.launch_us / 1e6 + 5 * PRODUCT / rate, rel=1e-12)


def test_a_run_and_the_plan_model_charge_the_attention_kernels_rate():
    """A model's blocks on fake tensors (F.scaled_dot_product_attention with is_causal, as the
    workloads call it), at a sequence where attention is compute-bound, are charged less with
    cuDNN than with FlashAttention-2, by the attention kernels alone (the same FLOPs and bytes);
    the plan model's step follows, and MFU's FLOPs do not move."""
    kw = dict(seq_len=2048)
    sdpa, cudnn = (measure("llama-debug", 1, 1, 2, "h100", attention=x, **kw).parts["dense"] for x in ("sdpa", "cudnn"))
    assert cudnn.forward_s < sdpa.forward_s and cudnn.backward_s < sdpa.backward_s
    assert cudnn.activations == sdpa.activations and cudnn.optimizer_s == pytest.approx(sdpa.optimizer_s, rel=1e-12)
    system = System("h100", 8)
    a, b = (planner.cost(system, "llama-debug", Parallel(dp=8), 16, attention=x, **kw) for x in ("sdpa", "cudnn"))
    assert b.breakdown.compute < a.breakdown.compute and b.step_s < a.step_s
    assert b.mfu * b.step_s == pytest.approx(a.mfu * a.step_s, rel=1e-12)  # the model's FLOPs: the same
    # the same kernels on the same block at a sequence where attention is memory-bound cost the same
    short = [measure("llama-debug", 1, 1, 2, "h100", attention=x).parts["dense"].forward_s for x in ("sdpa", "cudnn")]
    assert short[0] == short[1]


def test_the_rows_run_the_attention_their_framework_runs():
    """Transformer Engine prefers cuDNN attention on Hopper: Megatron-Core rows and AutoModel's rows with
    TE's attention (its DeepSeek-V3 configs, backend attn: te) run "cudnn"; torchtitan's (PyTorch's
    SDPA: FlashAttention-2) and the rest "sdpa", AutoModel's Llama 3 70B CP row among them (its
    config: attn_implementation: sdpa, "required for cp>1", with TE's Linear alone)."""
    rows = vt.load()
    for r in rows:
        want = "cudnn" if r.framework == "megatron-core" or "Transformer Engine" in r.extras else "sdpa"
        assert attention_of(r) == want, r.id
    assert {attention_of(r) for r in rows if r.framework == "torchtitan"} == {"sdpa"}
    assert {attention_of(r) for r in rows if r.framework == "megatron-core"} == {"cudnn"}
    by_id = {r.id: r for r in rows}
    assert attention_of(by_id["automodel-h100x64-llama3-70b"]) == "sdpa"
    assert {attention_of(r) for r in rows if r.framework == "automodel" and "deepseek" in r.id} == {"cudnn"}
    assert config_of("llama3-8b").seq_len == 8192  # the sequence the catalog's figures were measured at


def test_bad_attention_values_are_refused_naming_them(capsys):
    with pytest.raises(ValueError, match=r"attention = 'fa9' is unknown; choose one of sdpa, cudnn"):
        CostModel(H100, attention="fa9")
    with pytest.raises(ConfigError, match=r"attention = 'fa9' is unknown; choose one of sdpa, cudnn"):
        planner.cost(System("h100", 8), "llama-debug", Parallel(dp=8), 8, attention="fa9")
    with pytest.raises(ConfigError, match=r"attention.sdpa = \[0.3, 2\] is invalid; give four fractions"):
        Chip(name="toy", bf16_tflops=1, hbm_gb=1, hbm_tbps=1, scaleup_gbps=1, scaleup_latency_us=1,
             scaleout_latency_us=1, attention={"sdpa": [0.3, 2]})
    with pytest.raises(ConfigError, match=r"attention.cudn is not an attention implementation; give one of sdpa"):
        Chip(name="toy", bf16_tflops=1, hbm_gb=1, hbm_tbps=1, scaleup_gbps=1, scaleup_latency_us=1,
             scaleout_latency_us=1, attention={"cudn": [0.6, 0.5, 0.5, 0.4]})
    assert all("FlashAttention-3 paper" in chips.get(c).sources["attention"] for c in ("h100", "h200", "h100-hbm2e"))
    plan = ["plan", "--chip", "h100", "--devices", "8", "--workload", "llama-debug"]
    assert main(plan + ["--attention", "cudnn", "--confirm", "1"]) == 2  # before anything is measured or run
    assert "--confirm with --attention = 'cudnn': the fake-tensor runs charge" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse names the choices
        main(plan + ["--attention", "fa9"])
    assert e.value.code == 2 and "invalid choice: 'fa9'" in capsys.readouterr().err


def test_the_efficient_kernels_mask_type_says_whether_they_run_causally():
    """aten._efficient_attention_forward / _backward (the memory-efficient kernels) take no is_causal:
    their custom_mask_type is 0 without a mask and 1 or 2 for a causal one (top-left or bottom-right
    aligned), so a causal call is charged half the square at the causal rate, as the others are."""
    from relay.kernels import attention
    op = torch.ops.aten._efficient_attention_forward.default
    q, k, v = (torch.empty(B, T, H, D, device="meta") for _ in range(3))  # (batch, sequence, heads, head dim)
    args = lambda mask: (q, k, v, None, None, None, T, T, 0.0, mask, True)  # noqa: E731
    assert [attention.causal(op, args(m), {}) for m in (0, 1, 2)] == [False, True, True]
    assert attention.causal(op, args(0), {"custom_mask_type": 1}) is True
    back = torch.ops.aten._efficient_attention_backward.default
    assert "custom_mask_type" in [a.name for a in back._schema.arguments]
    out = (torch.empty(B, T, H, D, device="meta"), torch.empty(B, H, T, device="meta"))
    model = CostModel(H100)  # the rate each is charged at (q: its factor on the GEMM rate)
    plain, masked = (model.op_parts(op, args(m), None, out)[3] for m in (0, 1))
    fwd_eff, _, causal_fwd_eff, _ = H100.attention["sdpa"]
    assert masked / plain == pytest.approx(2 * causal_fwd_eff / fwd_eff, rel=1e-9)


def test_the_plan_header_names_the_attention_charged(capsys):
    """--attention cudnn on a chip without a cudnn table charges the GEMM rule, and says so."""
    args = ["plan", "--devices", "8", "--workload", "llama-debug", "--parallel", "dp=8", "--global-batch", "8"]
    assert main([*args, "--chip", "a100", "--attention", "cudnn"]) == 0
    assert "attention at the GEMM rule (a100 has no cudnn table)" in capsys.readouterr().out.splitlines()[0]
    assert main([*args, "--chip", "h100", "--attention", "cudnn"]) == 0
    assert ", cudnn attention," in capsys.readouterr().out.splitlines()[0]


def test_the_catalog_accepts_the_implementations_the_cost_model_charges():
    from relay.hardware.chips import ATTENTION_TABLES
    from relay.kernels.attention import IMPLEMENTATIONS
    assert ATTENTION_TABLES == IMPLEMENTATIONS
