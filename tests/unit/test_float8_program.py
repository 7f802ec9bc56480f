"""A program's own float8 training (torchao's Float8Linear, as torchtitan's float8 converter
installs it) on Relay's fake tensors, charged as it runs (kernels/fp8.py): each of a Linear's
three GEMMs is torch._scaled_mm on float8 operands, at the chip's FP8 peak x its fp8_eff with
operands at 1 byte, never the BF16 `mm` torchao's tensor subclass is called with; the casts are
their own memory-bound ops; a chip without FP8 refuses it; and the virtual CUDA device reports
each NVIDIA chip's compute capability, which torchtitan's converter checks (>= 8.9 for FP8)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torchao.float8 import Float8LinearConfig, convert_to_float8_training

from relay import chips
from relay.device.backend.cuda import CAPABILITY, DEFAULT_CAPABILITY
from relay.kernels import fp8
from relay.kernels.clock import VirtualLane
from relay.kernels.cost import CostModel
from relay.kernels.gemm import quantisation
from relay.kernels.throttle import Throttle

M, K, N = 8192, 4096, 2048  # tokens, in features, out features (Llama 3 8B's scale, on fake tensors)


def _run(chip, recipe, fusion="eager"):
    """Forward and backward of one float8 Linear on fake tensors under the throttle: its log of
    (seconds, FLOPs, bytes) per charged op, and the throttle."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        layer = torch.nn.Sequential(torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16))
        convert_to_float8_training(layer, config=Float8LinearConfig.from_recipe_name(recipe))
        x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    with fake, Throttle(CostModel(chip, fusion=fusion), VirtualLane()) as t:
        t.log = []
        layer(x).sum().backward()
    return t.log, t


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])  # the published runs'; torchtitan 0.3.0's default
def test_a_float8_linear_is_charged_as_three_scaled_mm_at_the_fp8_peak(recipe):
    h200 = chips.get("h200")
    log, t = _run(h200, recipe)
    gemms = [(s, f, b) for s, f, b in log if f]
    # (m, k, n) of the forward, the input gradient and the weight gradient
    shapes = [(M, K, N), (M, N, K), (N, M, K)]
    assert [f for _, f, _ in gemms] == [2 * m * k * n for m, k, n in shapes]  # counted once each
    rate = h200.fp8_tflops * 1e12 * h200.fp8_eff  # FP8 FLOP/s of a large GEMM on the chip
    for (s, f, b), (m, k, n) in zip(gemms, shapes):
        operands = m * k + k * n  # float8, 1 byte an element
        assert operands + 2 * m * n <= b < operands + 2 * m * n + 2 * (m + n) * 2  # + the scales (fp32)
        launch = h200.launch_us / 1e6  # and launch included, no faster than the chip's fastest FP8 GEMM measured
        expected = launch + max(f / (quantisation(m, n, h200.compute_units, 1, k) * rate),
                                f / (h200.fp8_mamf_tflops * 1e12) - launch, b / (h200.hbm_Bps * h200.mem_eff))
        assert s == pytest.approx(expected, rel=1e-12)
    # the GEMMs are a fraction of a BF16 run's: the casts and scales are ops of their own
    assert len(log) > 3 * len(gemms) and t.flops == sum(f for _, f, _ in gemms)


def test_fused_chains_charge_the_casts_less_and_the_gemms_the_same():
    """`relay launch --fusion fused` (a program run with torch.compile): the amax / scale / cast ops
    chain into fewer kernels moving fewer bytes; the FP8 GEMMs are charged as in eager."""
    h200 = chips.get("h200")
    eager, e = _run(h200, "rowwise")
    fused, f = _run(h200, "rowwise", "fused")
    # the three _scaled_mm (compute-bound: a spilled scale read back adds bytes, not time)
    assert [x[:2] for x in fused if x[1]] == [x[:2] for x in eager if x[1]]
    other = [sum(s for s, fl, _ in log if not fl) for log in (eager, fused)]
    assert other[1] < 0.6 * other[0] and f.bytes < e.bytes


def test_a_chip_without_fp8_refuses_the_scaled_mm():
    for name in ("a100", "ascend-910c"):
        with pytest.raises(fp8.NoFp8, match=f"'{name}' has no FP8 tensor cores.*capability 8.9"):
            _run(chips.get(name), "tensorwise")


def test_float8_tensors_are_charged_at_one_byte_whatever_the_emulated_dtype():
    model = CostModel(chips.get("h100"))
    assert model.tensor_bytes(torch.empty(10, dtype=torch.float8_e4m3fn)) == 10
    assert model.tensor_bytes(torch.empty(10, dtype=torch.float32)) == 20  # (the emulated BF16)


def test_the_virtual_device_reports_fp8_capability_exactly_on_the_nvidia_chips_with_fp8():
    """torchtitan's float8 converter runs on capability >= 8.9 and refuses below it."""
    for c in (chips.get(n) for n in chips.names()):
        capability = CAPABILITY.get(c.name, DEFAULT_CAPABILITY)
        if c.vendor == "Nvidia":
            assert (capability >= (8, 9)) == (c.fp8_tflops is not None), c.name
        else:  # reported as an A100, without FP8 whatever the chip has
            assert capability == DEFAULT_CAPABILITY, c.name


def test_relay_launch_fusion_reaches_the_devices_cost_model():
    """`relay launch --fusion fused` (what --programs passes for a compiled row): the device's cost
    model, built from the job, charges fused chains; eager stays the default; others are refused."""
    from relay import Cluster, System
    from relay.driver.pacing import make_job
    from relay.launch.cli import build_parser

    parser = build_parser()
    base = ["launch", "--chip", "h200", "--devices", "2", "-m", "torchtitan.train"]
    assert parser.parse_args(base).fusion == "eager"
    args = parser.parse_args(base[:1] + ["--fusion", "fused"] + base[1:])
    job = make_job(Cluster(System("h200", 2), efficiency={"fusion": args.fusion}), 1.0, 0.0)
    assert [job.cost_model(r).fusion for r in range(2)] == ["fused", "fused"]
    with pytest.raises(SystemExit):
        parser.parse_args(base[:1] + ["--fusion", "compiled"] + base[1:])
    # and cmd_launch itself hands it to the cluster it starts (stopped there: nothing is launched)
    from relay.launch import script

    class Made(Exception):
        pass

    def made(system, **kw):
        raise Made(kw.get("efficiency"))

    real, script.Cluster = script.Cluster, made
    try:
        for fusion in ("fused", "eager"):
            with pytest.raises(Made) as e:
                script.cmd_launch(parser.parse_args(base[:1] + ["--fusion", fusion] + base[1:]))
            assert e.value.args[0] == {"fusion": fusion}
    finally:
        script.Cluster = real
