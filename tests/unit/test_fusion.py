"""The fused kernel mode (kernels/fusion.py) and Megatron's communication overlaps
(analytic/megatron.py): a fused chain's charge by hand, fused never above eager on any chain, bad
values refused, and `relay validate --training` rows costed with the mode their framework runs."""

import random

import pytest
import torch

from relay import System, chips
from relay.analytic import megatron, planner
from relay.analytic.footprint import config_of, measure
from relay.device.fake.measure import step_cost
from relay.errors import ConfigError
from relay.hardware.chips import Chip
from relay.kernels.clock import VirtualLane
from relay.kernels.cost import CostModel
from relay.kernels.throttle import Throttle
from relay.launch import validate_training as vt
from relay.launch.cli import main
from relay.launch.training_frameworks import FRAMEWORKS
from relay.parallel import Parallel

TOY = Chip(name="toy", bf16_tflops=1, hbm_gb=1, hbm_tbps=1, scaleup_gbps=1, scaleup_latency_us=1,
           scaleout_latency_us=1, matmul_eff=0.5, mem_eff=0.5, launch_us=1)
BYTE_RATE, LAUNCH = 0.5e12, 1e-6  # the toy chip's bytes/s after efficiency; its launch, s
H100 = chips.get("h100")


def charged(fn, *args, fusion="eager", chip=TOY, dtype="bf16"):
    """(emulated seconds, FLOPs, bytes) that fn(*args) is charged."""
    lane = VirtualLane()
    with Throttle(CostModel(chip, dtype, fusion=fusion), lane) as t:
        fn(*args)
    return lane.t, t.flops, t.bytes


def test_a_fused_chain_pays_one_launch_and_its_inputs_and_output_by_hand():
    n = 1024 * 256
    x, y, z = (torch.randn(1024, 256) for _ in range(3))

    def chain(x, y, z):
        return torch.relu((x + y) * z)  # add, mul, relu: each reads the one before

    # eager: three kernels, each reading its inputs and writing its output (2 bytes an element)
    seconds, _, nbytes = charged(chain, x, y, z)
    assert nbytes == (3 + 3 + 2) * n * 2
    assert seconds == pytest.approx(3 * LAUNCH + (3 + 3 + 2) * n * 2 / BYTE_RATE, rel=1e-12)
    # fused: one kernel reads x, y, z once and writes the result; x + y and its product stay in registers
    seconds, _, nbytes = charged(chain, x, y, z, fusion="fused")
    assert nbytes == 4 * n * 2
    assert seconds == pytest.approx(LAUNCH + 4 * n * 2 / BYTE_RATE, rel=1e-12)


def test_an_intermediate_read_after_its_chain_is_charged_back():
    x, y = torch.randn(512, 512), torch.randn(512, 512)
    n = 512 * 512

    def spill(x, y):
        a = x + y
        b = torch.relu(a)  # the chain drops a's write ...
        return torch.mm(a, b)  # ... which the GEMM reads from HBM: a is written after all

    _, flops, nbytes = charged(spill, x, y, fusion="fused")
    assert nbytes == (2 * n + n) * 2 + n * 2 + 3 * n * 2  # chain: x, y in, b out; a spilled; the GEMM's a, b, out
    assert flops == 2 * 512 ** 3


def test_an_fp8_gemm_operand_written_by_the_chain_before_it_is_cast_there():
    m, k, n = 512, 1024, 2048
    x, g, w = torch.randn(m, k), torch.randn(m, k), torch.randn(k, n)
    launch, rate = H100.launch_us / 1e6, H100.hbm_Bps * H100.mem_eff

    def norm_then_linear(x, g, w):
        return torch.mm(x * g, w)

    eager, _, _ = charged(norm_then_linear, x, g, w, chip=H100, dtype="fp8")
    fused, _, _ = charged(norm_then_linear, x, g, w, chip=H100, dtype="fp8", fusion="fused")
    # the product's amax and cast (2 kernels: reads 2 + 2 bytes, writes 1) become the chain's FP8 write (1 byte)
    assert eager - fused == pytest.approx(2 * launch + m * k * (2 + 2 + 1 - 1) / rate, rel=1e-9)


def _program(rng: random.Random, x: torch.Tensor):
    """A random chain of elementwise, reduction, copy and GEMM ops over a few tensors."""
    pool = [x, x.clone().mul_(0.5), x.t().contiguous()]
    ops = [lambda a, b: a + b, lambda a, b: a * b, lambda a, b: torch.relu(a), lambda a, b: torch.exp(-a.abs()),
           lambda a, b: a.sum(-1, keepdim=True) * b, lambda a, b: torch.mm(a, b), lambda a, b: a.clone(),
           lambda a, b: torch.cat([a[:, :8], b[:, 8:]], 1), lambda a, b: a.add_(1.0)]
    for _ in range(20):
        a, b = rng.choice(pool), rng.choice(pool)
        pool.append(rng.choice(ops)(a, b))
    return pool


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_fused_never_charges_more_than_eager_on_any_chain(dtype):
    x = torch.randn(64, 64)
    for seed in range(8):
        eager = charged(lambda: _program(random.Random(seed), x.clone()), chip=H100, dtype=dtype)
        fused = charged(lambda: _program(random.Random(seed), x.clone()), chip=H100, dtype=dtype, fusion="fused")
        assert fused[1] == eager[1], seed  # the same FLOPs
        assert fused[0] <= eager[0] * (1 + 1e-12) and fused[2] <= eager[2], seed


def test_a_training_step_is_faster_fused_with_the_same_flops():
    eager = step_cost("llama-debug", 2, H100)
    fused = step_cost("llama-debug", 2, H100, fusion="fused")
    assert fused.flops == eager.flops and fused.forward_backward_flops == eager.forward_backward_flops
    assert fused.seconds < eager.seconds and fused.bytes < eager.bytes and fused.ops < eager.ops


def test_a_bad_fusion_or_overlap_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"fusion = 'turbo' is unknown; choose 'eager' .* or 'fused'"):
        CostModel(TOY, fusion="turbo")
    system = System("h100", 8)
    with pytest.raises(ConfigError, match=r"fusion = 'turbo' is unknown; choose 'eager'"):
        planner.cost(system, "llama-debug", Parallel(dp=8), 8, fusion="turbo")
    with pytest.raises(ConfigError, match=r"fusion = 'turbo' is unknown"):
        planner.search(system, "llama-debug", 8, fusion="turbo")
    with pytest.raises(ConfigError, match=r"overlap = 'ep' is unknown; choose among tp, p2p, dp"):
        planner.cost(system, "llama-debug", Parallel(dp=8), 8, overlap=("tp", "ep"))
    with pytest.raises(ConfigError, match=r"overlap = 'ep' is unknown"):  # one name, not its letters
        planner.cost(system, "llama-debug", Parallel(dp=8), 8, overlap="ep")
    with pytest.raises(SystemExit) as e:  # argparse names the choices
        main(["plan", "--chip", "h100", "--devices", "8", "--workload", "llama-debug", "--fusion", "turbo"])
    assert e.value.code == 2
    assert main(["plan", "--chip", "h100", "--devices", "8", "--workload", "llama-debug", "--fusion", "fused",
                 "--confirm", "1"]) == 2  # the runs charge eager kernels: refused, not compared


def test_tp_and_p2p_overlap_by_hand():
    class P:  # the plan fields megatron.py reads
        tp, interleaved, n_stages = 4, True, 2

    part = type("Part", (), {"forward_s": 1.0, "backward_s": 2.0})()
    fwd, bwd = megatron.tensor_parallel({"dense": (0.8, 0.1)}, {"dense": (3.0, 0.2)}, {"dense": part}, P, {"tp"})
    assert fwd == {"dense": (0.8 / 4, 0.1)}  # hidden behind the forward but one chunk of four
    assert bwd == {"dense": (3.0 - 2.0, 0.2)}  # what outlasts the backward's compute stays exposed
    assert megatron.tensor_parallel({"dense": (0.8, 0.1)}, {}, {"dense": part}, P, frozenset()) == \
        ({"dense": (0.8, 0.1)}, {})
    assert megatron.p2p(0.7, 1.0, P, {"p2p"}) == pytest.approx(0.2)  # a chunk's compute is 1.0 / 2
    P.fsdp = False
    assert megatron.data_parallel(0.6, P, {"dp"}) == 0.3  # one virtual stage's chunk of two exposed
    P.interleaved = False  # Megatron overlaps p2p only with virtual stages
    assert megatron.p2p(0.7, 1.0, P, {"p2p"}) == 0.7 and megatron.data_parallel(0.6, P, {"dp"}) == 0.6


def test_overlaps_hide_only_communication_in_a_plan():
    system = System("h100", 16, domain=8)
    plan = Parallel(dp=2, tp=2, pp=4, stages=2, microbatches=8)
    plain = planner.cost(system, "llama-debug", plan, 16)
    hidden = planner.cost(system, "llama-debug", plan, 16, overlap=("tp", "p2p", "dp"))
    assert hidden.breakdown.compute == plain.breakdown.compute
    assert 0 < hidden.breakdown.tensor_parallel < plain.breakdown.tensor_parallel
    assert hidden.breakdown.pipeline < plain.breakdown.pipeline
    assert hidden.breakdown.data_parallel == plain.breakdown.data_parallel / 2 > 0


def test_validate_rows_use_the_mode_their_framework_runs():
    rows = vt.load()
    assert {r.framework for r in rows} == set(FRAMEWORKS)
    for r in rows:
        lay = vt.layout(r)
        fused = r.framework == "megatron-core" or "torch.compile" in r.extras  # (AutoModel's DeepSeek-V3: eager)
        assert lay.fusion == ("fused" if fused else "eager"), r.id
        assert lay.overlap == (("tp", "p2p", "dp") if r.framework == "megatron-core" else ()), r.id
        if r.framework == "torchtitan" and "torch.compile" not in r.extras:
            assert lay.fusion == "eager", r.id  # eager torchtitan rows stay eager
    bad = dict(vars(rows[0]), framework="jax")
    with pytest.raises(ConfigError, match=r"framework = 'jax' is invalid; give one of megatron-core"):
        vt._check(vt.TrainingRow(**bad), "training.toml")


def test_fp8_weight_casts_are_charged_once_a_step_when_fused():
    c = config_of("llama-debug")
    launch, rate = H100.launch_us / 1e6, H100.hbm_Bps * H100.mem_eff
    kv, q = c.n_kv_heads * c.dim // c.n_heads, c.dim
    weights = [c.dim * q, c.dim * kv, c.dim * kv, q * c.dim, 3 * c.dim * c.ffn_dim]  # wq, wk, wv, wo, w1 + w2 + w3
    part = measure("llama-debug", 1, 1, 2, "h100", dtype="fp8", fusion="fused").parts["dense"]
    # each of the block's 7 weights cast in forward and for the input gradient: 2 kernels, 2 + 2 + 1 bytes each
    assert part.weight_cast_s == pytest.approx(7 * 2 * 2 * launch + 2 * 5 * sum(weights) / rate, rel=1e-9)
    assert measure("llama-debug", 1, 1, 2, "h100", dtype="fp8").parts["dense"].weight_cast_s == 0.0  # eager: torchao
    # the planner: a second accumulated microbatch costs its compute less the casts the first one made
    def per_microbatch(fusion):
        parts = measure("llama-debug", 1, 1, 2, "h100", dtype="fp8", fusion=fusion).parts
        return c.n_layers * (parts["dense"].forward_s + parts["dense"].backward_s) + parts["base"].forward_s + \
            parts["base"].backward_s

    def compute(m, fusion):
        return planner.cost(System("h100", 1), "llama-debug", Parallel(microbatches=m), 2 * m, dtype="fp8",
                            fusion=fusion).breakdown.compute

    adds = compute(2, "eager") - compute(1, "eager") - per_microbatch("eager")  # the gradient accumulation's adds
    assert compute(2, "fused") - compute(1, "fused") == \
        pytest.approx(per_microbatch("fused") + adds - c.n_layers * part.weight_cast_s, rel=1e-9)
