"""The memory model (emulator/analytic/footprint.py, activations.py) against what published runs held
and what their frameworks do: sequence parallel's share of a checkpointed block's input, FSDP2
under torch's pipelining, the layouts `relay validate --training` runs for torchtitan and the
Llama 3 paper, and the torchtitan H100 those rows ran on. No Ray: fake-tensor blocks and closed
forms. Llama's block at bf16: s b h = tokens x width, t = tp (2 bytes an element)."""

import pytest

from relay import chips
from relay.analytic.footprint import GB, footprint, measure, parameters
from relay.hardware.chips import FIGURES
from relay.launch import validate_training as vt
from relay.parallel import Parallel
from relay.workloads import llama

H100 = "h100"
C = llama.CONFIGS["llama3-70b"]
S, H = C.seq_len, C.dim
PIPE = dict(dp=2, tp=8, pp=4, microbatches=8)  # stage 0: 20 blocks, 4 microbatches in flight
ROWS = {r.id: r for r in vt.load()}


def test_sequence_parallel_keeps_a_tp_share_of_a_checkpointed_blocks_input():
    """Full recompute keeps each block's input: Korthikanti et al. 2022 (arXiv 2205.05198, Table 2)
    count it 2sbh per layer under tensor parallel alone. Under sequence parallel the residual stream
    between blocks is the sequence's shard (plans.py, as torchtitan: RowwiseParallel to Shard(1)),
    so a device keeps 2sbh / t; plus one block's whole activations (its norms' / t) while it
    recomputes. Stage 0 is the peak (20 blocks x 4 microbatches in flight; the last stage holds 1
    and the head's logits and loss, vocab / t of them: plans.vocab_parallel)."""
    t = PIPE["tp"]
    parts = measure("llama3-70b", t, 1, 1, H100).parts
    part = parts["dense"]
    working = part.activations - part.norm_bytes * (1 - 1 / t)
    sp = footprint("llama3-70b", Parallel(**PIPE, recompute=True, sp=True), 16, H100)
    assert "stage 0" in sp.device
    assert sp.activations == pytest.approx(4 * 20 * 2 * S * H / t + working, rel=1e-9)
    tp_alone = footprint("llama3-70b", Parallel(**PIPE, recompute=True), 16, H100)
    assert "stage 0" in tp_alone.device
    assert tp_alone.activations == pytest.approx(4 * 20 * 2 * S * H + part.activations, rel=1e-9)


def test_megatrons_sequence_parallel_keeps_a_tp_share_of_the_gathered_linear_inputs():
    """Without checkpointing, DTensor's sequence parallel (torchtitan, Relay's runs) saves the
    all-gathered inputs of the column-wise layers whole; Megatron saves its shard and gathers it
    again in backward (regather), so each dense block keeps (1 - 1/t) of two s b h inputs (its
    attention's and its MLP's) less, in every microbatch in flight (4 x 20 blocks on stage 0), and
    in nothing else."""
    t = PIPE["tp"]
    plan = Parallel(**PIPE, sp=True)
    dtensor, megatron = (footprint("llama3-70b", plan, 16, H100, regather=r) for r in (False, True))
    assert "stage 0" in dtensor.device and "stage 0" in megatron.device
    assert dtensor.activations - megatron.activations == pytest.approx(4 * 20 * 2 * (2 * S * H) * (1 - 1 / t),
                                                                       rel=1e-9)
    assert (megatron.parameters, megatron.gradients, megatron.optimizer) == \
        (dtensor.parameters, dtensor.gradients, dtensor.optimizer)
    # without sequence parallel there is no gather to redo: nothing changes
    plain = Parallel(**PIPE)
    assert footprint("llama3-70b", plain, 16, H100, regather=True) == footprint("llama3-70b", plain, 16, H100)
    # the rows: Megatron's and the Llama 3 paper's tensor-parallel rows regather, torchtitan's do not
    meta, titan = ROWS["llama3-paper-h100x8192-405b"], ROWS["torchtitan-h100x256-llama3-70b-tp8"]
    assert vt.cost(meta, vt.layout(meta)).memory == footprint(
        "llama3-405b", vt.layout(meta).plan, meta.global_batch, H100, regather=True)
    lay = vt.layout(titan)
    assert vt.cost(titan, lay).memory == footprint("llama3-70b", lay.plan, titan.global_batch, titan.chip)


def test_a_cp_rank_costed_for_its_group_shards_the_optimizer_over_dp_x_cp():
    """A pipeline row with context parallel runs one CP rank of each group (its micro-batches kept):
    the CP ranks hold the same parameters, and Megatron's distributed optimizer shards over the
    data- and context-parallel ranks together, so the state is 1 / (dp cp) of the stage's."""
    row = ROWS["mbridge-b200x128-llama3-405b-fp8"]
    lay = vt.layout(row)
    assert (row.cp, lay.cp, lay.plan.dp, lay.plan.dist_opt) == (2, 2, 2, True)
    kw = dict(dtype=lay.dtype, seq_len=lay.seq_len, fusion=lay.fusion, attention="cudnn", regather=True)
    one, group = (footprint(row.workload, lay.plan, row.global_batch, row.chip, **kw, cp=c) for c in (1, 2))
    assert group.optimizer == pytest.approx(one.optimizer / 2, rel=1e-12)
    assert (group.parameters, group.gradients, group.activations) == (one.parameters, one.gradients,
                                                                      one.activations)
    assert vt.cost(row, lay).memory == group and "optimizer state sharded over dp x cp" in " ".join(
        lay.approximations)


def test_fsdp_under_a_pipeline_holds_the_stages_parameters_and_gradients_unsharded():
    """torch's pipelining runs FSDP2 without resharding after the first backward and without a
    gradient sync until the reduce-scatter after the last microbatch (stage.py:
    backward_maybe_with_nosync, perform_reduce_grad); the Llama 3 paper's FSDP likewise 'do[es] not
    reshard after forward'. So a stage holds all its blocks' parameters and gradients whole, beside
    the 1/dp shards; without a pipeline, one block gathered (FSDP2's unit)."""
    n = parameters("llama3-70b", 8, 1).parts
    stage = 20 * n["dense"].params + n["base"].params / 2  # stage 0: embedding + 20 blocks
    fp = footprint("llama3-70b", Parallel(dp=4, tp=8, pp=4, microbatches=8, fsdp=True), 32, H100)
    assert fp.parameters == pytest.approx(2 * (stage / 4 + stage), rel=1e-9)
    # and, on stage 0, DTensor's whole-vocabulary embedding gradient before each device keeps its rows
    assert fp.gradients == pytest.approx(2 * (stage + 7 * n["base"].params / 2), rel=1e-9)
    assert fp.optimizer == pytest.approx(12 * stage / 4, rel=1e-9)
    flat = footprint("llama3-70b", Parallel(dp=4, tp=8, microbatches=8, fsdp=True), 32, H100)
    whole = 80 * n["dense"].params + n["base"].params
    assert flat.parameters == pytest.approx(2 * (whole / 4 + n["dense"].params), rel=1e-9)


def test_torchtitan_and_llama3_paper_tp_rows_run_sequence_parallel_and_the_paper_8_chunks():
    """torchtitan's apply_tp puts every norm on SequenceParallel; the Llama 3 paper's TP is
    Korthikanti et al.'s; Megatron-Bridge's TP comm overlap (costed on its rows) is gated on
    sequence parallel; tp = 1 has none. The paper's rows interleave 8 chunks a rank (one layer a
    chunk: section 3.3.2, see the row's note)."""
    for rid in ("torchtitan-h100x256-llama3-70b-tp8", "torchtitan-h100x64-llama3-8b-tp8",
                "llama3-paper-h100x8192-405b", "llama3-paper-h100x16384-405b", "mbridge-h100x64-llama3-70b-fp8"):
        assert vt.layout(ROWS[rid]).plan.sp, rid
    for rid in ("torchtitan-h100x8-llama3-8b", "mbridge-h100x8-llama3-8b-fp8"):
        assert not vt.layout(ROWS[rid]).plan.sp, rid
    paper = vt.layout(ROWS["llama3-paper-h100x8192-405b"]).plan
    assert (paper.pp, paper.n_stages, paper.n_microbatches) == (16, 8, 32)


def test_torchtitans_published_70b_tp_layout_fits_its_chip():
    """A published layout that ran fits in Relay's model (it was 235 GB of 80 before the block
    inputs were kept at 1/tp): 70B FSDP 32 x TP 8, local batch 16, full AC on the Grand Teton H100
    (96 GB; torchtitan published 71.9 GiB for it with Float8). By hand: 80 blocks x 16 samples x
    2sbh / 8 kept, plus one block's working set (its norms' / 8) and the head's (logits and loss,
    whole: plans.py replicates the head where torchtitan's loss parallel splits it by vocabulary).
    (The 405B TP 8 row, 134 GB before, is 72.6 GB now: bench/memory_vs_published.py.)"""
    row = ROWS["torchtitan-h100x256-llama3-70b-tp8"]
    lay = vt.layout(row)
    fp = footprint(row.workload, lay.plan, row.global_batch, row.chip, dtype=lay.dtype, seq_len=lay.seq_len)
    assert fp.fits, fp.describe()
    parts = measure("llama3-70b", 8, 1, 16, row.chip).parts
    working = parts["dense"].activations - parts["dense"].norm_bytes * (1 - 1 / 8)
    kept = 80 * 16 * 2 * S * H / 8
    assert fp.activations == pytest.approx(kept + working + parts["base"].activations, rel=1e-9)
    assert kept / GB == pytest.approx(21.47, abs=0.01)


def test_the_grand_teton_h100_is_a_sourced_catalog_chip():
    """torchtitan's H100 benchmarks ran on 96 GB HBM2e at 2.4 TB/s, 500 W (its performance page's
    405B run too: 'HBM2e based lower TDP SXM H100'); its peak is unpublished, 'between SXM and NVL':
    an estimate, interpolated by power limit between the SXM's (700 W) and the NVL's (400 W), for BF16
    and FP8 alike; every figure has a source."""
    c, sxm = chips.get("h100-hbm2e"), chips.get(H100)
    assert (c.hbm_bytes, c.hbm_Bps, c.power_w) == (96e9, 2.4e12, 500)
    for dtype, nvl in (("bf16", 835.5e12), ("fp8", 1670.5e12)):
        assert c.is_estimate(f"{dtype}_tflops")
        assert c.peak_flops(dtype) == pytest.approx(nvl + (sxm.peak_flops(dtype) - nvl) * (500 - 400) / (700 - 400),
                                                    abs=0.05e12)
    for f in FIGURES:
        if getattr(c, f) is not None:
            assert c.sources.get(f), f
    titan = [r for r in ROWS.values() if r.id.startswith("torchtitan-h100")]
    assert len(titan) == 7 and all(r.chip == "h100-hbm2e" for r in titan)
