"""The named full-size configurations on fake tensors: parameter counts, FLOPs and activation
memory against the published figures and closed forms (emulator/workloads/analytic.py). Each
runs models of 0 and 1 block per kind and scales by the block count (`by_layers`, exact), so
the whole file takes seconds, not the hours a real run would."""

import functools
from dataclasses import replace

import pytest

from relay.device.fake.measure import by_layers, memory, step_cost
from relay.hardware.chips import get as get_chip
from relay.workloads import analytic, get, llama, moe

H100 = get_chip("h100")


def config(name):
    return {**llama.CONFIGS, **moe.CONFIGS}[name]


@functools.cache
def counted(name: str) -> dict:
    """One device, one sample of the configuration's sequence length, forward and backward."""
    return by_layers(name, lambda wl: {**memory(wl, 1), "flops": step_cost(wl, 1, H100, optimizer_step=False).flops})


# published totals (and active parameters for the mixtures), billions: Llama 3 paper Table 3 and
# model cards (8.03, 70.6, 405.9); DeepSeek-V3 report (671 total, 37 active); Mixtral (46.7, 12.9)
PUBLISHED = {"llama3-8b": (8.03, None), "llama3-70b": (70.6, None), "llama3-405b": (405.9, None),
             "mixtral-8x7b": (46.7, 12.9), "deepseek-v3": (671.0, 37.0)}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_named_configurations_have_their_published_parameter_counts(name):
    total, active = PUBLISHED[name]
    n = counted(name)["parameter_count"]
    assert n / 1e9 == pytest.approx(total, rel=0.005)
    if active:
        c = config(name)
        inactive = (c.n_layers - c.n_dense_layers) * (c.n_experts - c.top_k) * 3 * c.dim * c.expert_dim
        assert (n - inactive) / 1e9 == pytest.approx(active, rel=0.02)
    assert get(name).tokens_per_sample == config(name).seq_len


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_counted_flops_equal_6_n_t_plus_attention(name):
    c = config(name)
    formula = analytic.llama_flops if name.startswith("llama") else analytic.moe_flops
    expected = formula(c, c.seq_len)
    print(f"{name}: counted {counted(name)['flops']:.4e} FLOP, 6NT + attention {expected:.4e} FLOP")
    assert counted(name)["flops"] == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("name", ["llama3-8b", "llama3-70b", "llama3-405b", "mixtral-8x7b"])
def test_activation_memory_per_block_matches_korthikanti_adapted(name):
    """Saved activations of one block (1 sample) against sbh(34 + 5as/h) adapted for GQA,
    SwiGLU, fused attention and RMSNorm (analytic.llama_activations), within 10%."""
    c = config(name)
    wl = get(name)
    family = llama if name.startswith("llama") else moe
    base, one = (memory(family.workload(name, _layers(c, n)), 1)["activations"] for n in (0, 1))
    formula = analytic.llama_activations if name.startswith("llama") else analytic.moe_gqa_activations
    expected = formula(c, 1)
    print(f"{name}: {one - base:.4e} B saved per block, formula {expected:.4e} B")
    assert one - base == pytest.approx(expected, rel=0.10)
    assert wl.config is c


def _layers(c, n):
    extra = {"n_dense_layers": 0} if hasattr(c, "n_dense_layers") else {}
    return replace(c, n_layers=n, **extra)


def test_memory_breakdown_of_llama3_70b_per_device():
    """Unsharded, one 8K-token sample: bf16 weights and gradients, fp32 master weights and
    AdamW moments (12 B per parameter), activations = base + 80 blocks."""
    m = counted("llama3-70b")
    n = m["parameter_count"]
    assert m["parameters"] == m["gradients"] == 2 * n and m["optimizer"] == 12 * n
    c = config("llama3-70b")
    per_block = analytic.llama_activations(c, 1)
    assert m["activations"] == pytest.approx(80 * per_block, rel=0.05)  # the blocks dominate
    assert m["total"] == m["parameters"] + m["gradients"] + m["optimizer"] + m["activations"]
    print({k: f"{v / 1e9:.1f} GB" for k, v in m.items() if k not in ("parameter_count", "flops")})


def test_a_full_size_workload_on_real_tensors_is_refused_with_the_fix():
    """Real tensors of 405 billion parameters (6.5 TB with Adam) exhaust any host: refused before
    anything is allocated (counted on the meta device), naming the workload and what to do instead."""
    from relay.trainer import TrainConfig, memory_estimate
    with pytest.raises(ValueError, match=r"workload = 'llama3-405b' has 406 billion parameters.*llama-debug.*fake"):
        memory_estimate(TrainConfig(workload="llama3-405b"), 1)
