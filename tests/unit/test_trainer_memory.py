"""What real trainers do, in the memory model (emulator/analytic/footprint.py, activations.py):
selective activation checkpointing, sequence parallel, gradient accumulation without a pipeline
and the distributed optimizer, against hand-computed and published figures. No Ray: fake-tensor
blocks and closed forms.

Llama's block, s b h = tokens x width, f = SwiGLU width, a heads, g key/value heads, t = tp, at
bf16 (2 bytes an element; fp32 tensors counted at the emulated dtype, as the measurement does)."""

import pytest

from relay.analytic import planner
from relay.analytic.footprint import GB, footprint, in_flight, measure, parameters
from relay.hardware.system import System
from relay.parallel import Parallel
from relay.workloads import llama

H100, B200 = "h100", "b200"
C = llama.CONFIGS["llama3-70b"]
S, H, A, G, F = C.seq_len, C.dim, C.n_heads, C.n_kv_heads, C.ffn_dim
PIPE = dict(dp=2, tp=8, pp=4, microbatches=8)  # stage 0: 20 blocks, 4 microbatches in flight


def test_selective_op_checkpointing_keeps_the_input_and_torchtitans_saved_ops():
    """torchtitan's op policy on a Llama block (per microbatch of one sample): the block's input
    (2sbh) and the outputs of mm 1, 3, 5, 7 of wq, wk, wv, wo, w1, w3, w2 (wq 2sbh/t, wv
    2sbh g/(a t), w1 2sbf/t, w2's partial sum 2sbh) and flash attention (output 2sbh/t, its
    log-sum-exp 2sba/t); plus one block's whole activations while it is recomputed."""
    t = PIPE["tp"]
    kept = 2 * S * H + 2 * S * H / t + 2 * S * H * G / (A * t) + 2 * S * H / t + 2 * S * A / t + 2 * S * F / t \
        + 2 * S * H
    whole = measure("llama3-70b", t, 1, 1, H100).parts["dense"].activations
    op = footprint("llama3-70b", Parallel(**PIPE, ac="op"), 16, H100)
    assert op.activations == pytest.approx(4 * 20 * kept + whole, rel=1e-9)
    plain = footprint("llama3-70b", Parallel(**PIPE), 16, H100)
    full = footprint("llama3-70b", Parallel(**PIPE, recompute=True), 16, H100)
    assert full.activations < op.activations < plain.activations / 2


def test_selective_layer_checkpointing_recomputes_every_nth_block():
    """ac=layer:2: blocks 2, 4, ... of the device keep their input (2sbh), the others everything:
    stage 0's 20 blocks, 10 of each, 4 microbatches in flight, plus one recomputed block."""
    whole = measure("llama3-70b", 8, 1, 1, H100).parts["dense"].activations
    fp = footprint("llama3-70b", Parallel(**PIPE, ac="layer:2"), 16, H100)
    assert fp.activations == pytest.approx(4 * (10 * whole + 10 * 2 * S * H) + whole, rel=1e-9)
    assert footprint("llama3-70b", Parallel(**PIPE, ac="layer:1"), 16, H100).activations == \
        footprint("llama3-70b", Parallel(**PIPE, recompute=True), 16, H100).activations


def test_sequence_parallel_divides_the_norms_activations_by_tp():
    """Korthikanti et al. 2022 (arXiv 2205.05198, Table 2): sequence parallel turns a layer's
    sbh(10 + 24/t + 5as/(ht)) into sbh(34/t + 5as/(ht)): what the norms (and dropouts) save is
    divided by t. As plans.py runs it (DTensor), the norms' 8sbh + 4sb (PyTorch's RMSNorm: input,
    normalised output, 1/rms; two per block) divide by t; the column-wise layers' gathered
    inputs (4sbh, which Megatron saves sharded and gathers again) stay whole."""
    t = PIPE["tp"]
    part = measure("llama3-70b", t, 1, 1, H100).parts["dense"]
    assert part.norm_bytes == 8 * S * H + 4 * S
    plain = footprint("llama3-70b", Parallel(**PIPE), 16, H100)
    sp = footprint("llama3-70b", Parallel(**PIPE, sp=True), 16, H100)
    assert plain.activations - sp.activations == pytest.approx(4 * 20 * (8 * S * H + 4 * S) * (1 - 1 / t), rel=1e-9)


def test_gradient_accumulation_holds_one_microbatch_and_fsdp2_sharded_gradients():
    """dp=8 on 32 samples in 4 microbatches holds one microbatch's (1 sample's) activations, as
    dp=8 on 8 samples does; under FSDP2 each microbatch reduce-scatters into the shards (as
    torchtitan accumulates), so gradients stay sharded as without accumulation."""
    one = footprint("llama3-8b", Parallel(dp=8), 8, H100, seq_len=2048)
    acc = footprint("llama3-8b", Parallel(dp=8, microbatches=4), 32, H100, seq_len=2048)
    assert acc.activations == one.activations and acc.optimizer == one.optimizer
    fsdp = footprint("llama3-8b", Parallel(dp=8, fsdp=True), 32, H100, seq_len=2048)
    fsdp_acc = footprint("llama3-8b", Parallel(dp=8, fsdp=True, microbatches=4), 32, H100, seq_len=2048)
    assert fsdp_acc.gradients == pytest.approx(fsdp.gradients, rel=1e-9) and one.gradients > 4 * fsdp.gradients
    assert fsdp_acc.parameters == fsdp.parameters and fsdp_acc.optimizer == fsdp.optimizer


def test_the_search_accumulates_where_a_replicas_batch_does_not_fit_at_once():
    """Without a pipeline the search tries microbatches of 1, 2 and 4 samples too (one gradient
    sync a step); the step charges each microbatch's forward and backward."""
    system = System(H100, 8, domain=8)
    every = list(planner.plans(system, "llama3-8b", 64, seq_len=2048))
    accumulated = {p.n_microbatches for p in every if p.pp == 1 and p.dp == 8}
    assert accumulated == {1, 2, 4, 8}  # 8 samples a replica: at once, or 4, 2, 1 at a time
    at_once = planner.cost(system, "llama3-8b", Parallel(dp=8, fsdp=True), 64, seq_len=2048)
    four = planner.cost(system, "llama3-8b", Parallel(dp=8, fsdp=True, microbatches=4), 64, seq_len=2048)
    assert four.micro_batch == 2 and at_once.micro_batch == 8
    assert four.memory.activations < at_once.memory.activations / 3
    assert four.breakdown.compute > at_once.breakdown.compute  # smaller GEMMs, more launches


def test_distributed_optimizer_is_zero_1():
    """ZeRO stage 1 (Rajbhandari et al. 2020, arXiv 1910.02054, Figure 1): with K = 12 bytes of
    optimizer state per parameter, P_os holds 2 + 2 + K / N_d bytes per parameter (7.5B
    parameters on N_d = 64: 31.4 GB, against 120 GB unsharded). Megatron's distributed optimizer
    (docs/source/api-guide/dist_optimizer.md: 'bf16 param, fp32 grads: 6 + 12/d') is the same
    with fp32 gradients; Relay keeps gradients at the emulated dtype (bf16)."""
    n = parameters("llama3-8b", 1, 1).parts
    total = n["base"].params + 32 * n["dense"].params
    fp = footprint("llama3-8b", Parallel(dp=64, dist_opt=True), 64, H100, seq_len=2048)
    per_parameter = (fp.parameters + fp.gradients + fp.optimizer) / total
    assert per_parameter == pytest.approx(4 + 12 / 64, rel=1e-6)
    assert 7.5e9 * per_parameter / GB == pytest.approx(31.4, abs=0.05)  # the paper's figure


def test_deepseek_v3_fits_gb200_at_megatron_bridges_published_layout():
    """Megatron-Bridge 25.11's DeepSeek-V3 pre-training on 256 GB200 (performance summary; recipe
    scripts/performance/configs/deepseek/deepseek_workload_base_configs.py,
    DEEPSEEK_V3_PRETRAIN_CONFIG_GB200_BF16_V2): TP1 PP4 VP4 EP64, GBS 4096, micro batch 1,
    seq 4096, Megatron's distributed optimizer, selective recompute (recompute_modules
    ["mla_up_proj"], no full recompute). It fits the 186 GB of a B200. Relay's nearest plan:
    dist_opt and torchtitan's selective op mode; without the distributed optimizer and without
    any checkpointing it does not fit (the optimizer state of every parameter on every replica,
    and every MoE layer's routed copies kept)."""
    layout = dict(dp=64, pp=4, ep=64, stages=4, microbatches=64)
    assert in_flight(Parallel(**layout), 0) == pytest.approx(19 / 4)  # (4 - 1) x 4 + 2 x 3 + 1 chunks
    kw = dict(seq_len=4096)
    meas = measure("deepseek-v3", 1, 64, 1, B200, **kw)
    naive = footprint("deepseek-v3", Parallel(**layout), 4096, B200, **kw, measured=meas)
    dist = footprint("deepseek-v3", Parallel(**layout, dist_opt=True), 4096, B200, **kw, measured=meas)
    published = footprint("deepseek-v3", Parallel(**layout, dist_opt=True, ac="op"), 4096, B200, **kw, measured=meas)
    assert not naive.fits and not dist.fits and published.fits
    assert dist.optimizer < naive.optimizer / 3  # the experts' state stays whole: ep = dp, one holder each
    assert published.total < 186 * GB < dist.total
