"""The cost model against costs computed by hand, on a toy chip with round figures:
1 TFLOPS bf16, 1 TB/s HBM, efficiencies 0.5, launch 1 us."""

import pytest
import torch
import torch.nn.functional as F

from relay import chips
from relay.hardware.chips import Chip
from relay.kernels.clock import VirtualLane
from relay.kernels.cost import CostModel
from relay.kernels.gemm import quantisation
from relay.kernels.throttle import Throttle

TOY = Chip(name="toy", bf16_tflops=1, hbm_gb=1, hbm_tbps=1, scaleup_gbps=1, scaleup_latency_us=1,
           scaleout_latency_us=1, matmul_eff=0.5, mem_eff=0.5, launch_us=1)
FLOP_RATE = 0.5e12  # FLOP/s after efficiency
BYTE_RATE = 0.5e12  # bytes/s after efficiency
LAUNCH = 1e-6


def charged(fn, *args, dtype="bf16"):
    """Emulated seconds and FLOPs that running fn(*args) is charged."""
    lane = VirtualLane()
    with Throttle(CostModel(TOY, dtype), lane) as t:
        fn(*args)
    return lane.t, t.flops, t.bytes


def test_mm():
    a, b = torch.randn(64, 128), torch.randn(128, 32)
    flops = 2 * 64 * 128 * 32
    nbytes = (64 * 128 + 128 * 32 + 64 * 32) * 2  # bf16: 2 bytes per element, whatever the host dtype
    seconds, f, by = charged(torch.mm, a, b)
    assert (f, by) == (flops, nbytes)
    q = quantisation(64, 32, None)  # a 64 x 32 output half-fills the smallest (64 x 64) tile
    assert q == 0.5
    assert seconds == pytest.approx(LAUNCH + max(flops / q / FLOP_RATE, nbytes / BYTE_RATE), rel=1e-12)
    assert flops / FLOP_RATE > nbytes / BYTE_RATE  # compute-bound


def test_bmm():
    a, b = torch.randn(4, 16, 32), torch.randn(4, 32, 8)
    flops, nbytes = 2 * 4 * 16 * 32 * 8, (4 * 16 * 32 + 4 * 32 * 8 + 4 * 16 * 8) * 2
    seconds, f, by = charged(torch.bmm, a, b)
    assert (f, by) == (flops, nbytes)
    q = quantisation(16, 8, None, batch=4)  # four 16 x 8 outputs, each in a 64 x 64 tile
    assert q == 16 * 8 / (64 * 64)
    assert seconds == pytest.approx(LAUNCH + flops / q / FLOP_RATE, rel=1e-12)


def test_conv2d():
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    # output 1 x 4 x 6 x 6; each output element is a 3*3*3 multiply-add
    flops = 2 * (1 * 4 * 6 * 6) * (3 * 3 * 3)
    nbytes = (1 * 3 * 8 * 8 + 4 * 3 * 3 * 3 + 1 * 4 * 6 * 6) * 2
    seconds, f, by = charged(F.conv2d, x, w)
    assert (f, by) == (flops, nbytes)
    assert seconds == pytest.approx(LAUNCH + flops / FLOP_RATE, rel=1e-12)


def test_elementwise_is_memory_bound():
    x, y = torch.randn(1000), torch.randn(1000)
    seconds, f, by = charged(torch.add, x, y)
    assert (f, by) == (0, 3000 * 2)
    assert seconds == pytest.approx(LAUNCH + 6000 / BYTE_RATE, rel=1e-12)


def test_reduction():
    seconds, f, by = charged(torch.sum, torch.randn(1000))
    assert (f, by) == (0, (1000 + 1) * 2)
    assert seconds == pytest.approx(LAUNCH + 2002 / BYTE_RATE, rel=1e-12)


def test_integer_tensors_count_their_real_size_and_fp8_stores_bf16():
    i = torch.arange(1000)
    assert charged(torch.add, i, i)[2] == 3 * 1000 * 8
    model = CostModel(chips.get("h100"), "fp8")  # torchao's float8 keeps BF16 tensors (tests/unit/test_fp8.py)
    assert model.tensor_bytes(torch.randn(10)) == 20 and model.tensor_bytes(torch.arange(10)) == 80


def test_real_sizes_charge_a_low_precision_runs_fp32_upcasts_at_four_bytes():
    """A run already in the emulated dtype (the plan model's fake blocks: measure_block) charges each
    floating tensor at its own size, so an fp32 upcast (torch's rms_norm on bf16, a loss in fp32)
    moves fp32 bytes; by default every float is at the emulated dtype's size (a model run in fp32
    for the emulated bf16)."""
    x = torch.randn(1000).to(torch.bfloat16)

    def bytes_of(real_sizes):
        with Throttle(CostModel(TOY, "bf16", real_sizes=real_sizes), VirtualLane()) as t:
            x.float()  # aten._to_copy: reads 1000 bf16, writes 1000 fp32
        return t.bytes

    assert (bytes_of(False), bytes_of(True)) == (1000 * (2 + 2), 1000 * (2 + 4))
    real = CostModel(TOY, "bf16", real_sizes=True)
    assert (real.tensor_bytes(torch.randn(10)), real.tensor_bytes(x[:10]), real.tensor_bytes(torch.arange(10))) \
        == (40, 20, 80)


def test_views_and_allocations_are_free():
    x = torch.randn(8, 8)
    assert charged(lambda: (x.view(64), x.t(), x[2:], torch.empty(10)))[0] == 0


def test_efficiency_overrides_and_validation():
    assert CostModel(TOY, matmul_eff=0.25).matmul_eff == 0.25
    assert CostModel(chips.get("h100")).matmul_eff == chips.get("h100").matmul_eff  # the catalog's, from MAMF
    assert CostModel(chips.get("tpu-v5e")).matmul_eff == chips.MATMUL_EFF  # no published figure: the default
    with pytest.raises(ValueError, match="mem_eff = 0 is invalid"):
        CostModel(TOY, mem_eff=0)
    with pytest.raises(ValueError, match="dtype = 'fp4' is not an emulated dtype"):
        CostModel(TOY, "fp4")


def test_matmul_cost_matches_the_executed_op():
    model = CostModel(chips.get("a100"))
    lane = VirtualLane()
    a = torch.randn(96, 80)
    with Throttle(model, lane):
        a @ a.t()
    assert lane.t == model.matmul_cost(96, 80, 96).seconds


class _Recording(VirtualLane):
    """A virtual lane that also keeps every charge, in order."""

    def __init__(self):
        super().__init__()
        self.charges = []

    def charge(self, cost: float) -> None:
        self.charges.append(cost)
        super().charge(cost)


class _NoMemo(dict):
    def __getitem__(self, key):
        raise KeyError(key)

    def __setitem__(self, key, value):
        pass


@pytest.mark.parametrize("name", ["gpt-tiny", "mlp"])
def test_memoised_flops_charge_every_op_exactly_what_the_formulas_charge(name, monkeypatch):
    from relay.kernels import cost
    from relay.workloads import get

    def charges() -> list[float]:
        wl = get(name)
        torch.manual_seed(0)
        model = wl.build_model()
        opt = torch.optim.AdamW(model.parameters(), lr=wl.lr)
        # the batches are made outside the throttle: a workload may cache its data
        batches = [b for _, b in zip(range(2), wl.batches(0, 1, 4, 0))]
        lane = _Recording()
        with Throttle(CostModel(chips.get("h100")), lane):
            for batch in batches:
                loss = wl.loss(model, batch)
                loss.backward()
                opt.step()
                opt.zero_grad()
        return lane.charges

    monkeypatch.setattr(cost, "_FLOPS", _NoMemo())
    formulas = charges()
    monkeypatch.setattr(cost, "_FLOPS", {})
    first, memoised = charges(), charges()  # the second run finds every FLOP count in the memo
    assert len(cost._FLOPS) > 0
    assert formulas == first == memoised  # to the bit, op by op


def test_attention_on_a_cpu_host_counts_the_flash_kernels_flops():
    """scaled_dot_product_attention runs CPU flash kernels on a CPU host, which torch's FLOP
    registry leaves out; they are charged the flash kernels' FLOPs (grouped-query heads too):
    forward QK^T and AV, backward four such products (the fifth, flash's recompute of QK^T, is
    charged as time, not as the model's FLOPs)."""
    B, H, KV, T, D = 2, 4, 2, 16, 8
    q = torch.randn(B, H, T, D, requires_grad=True)
    kv = torch.randn(B, KV, T, D, requires_grad=True)
    _, fwd, _ = charged(lambda: F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True))
    assert fwd == 2 * (2 * B * H * T * T * D)
    _, both, _ = charged(lambda: F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
                         .sum().backward())
    assert both == 6 * (2 * B * H * T * T * D)
