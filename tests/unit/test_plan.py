"""Memory per device under a plan (emulator/analytic/footprint.py) against the published formulas,
the memory check, and the plan search (emulator/analytic/planner.py, `relay plan`). No Ray: the
figures come from fake-tensor blocks (well under a second each at full size) and closed forms."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import loss_parallel
from torch.testing._internal.distributed.fake_pg import FakeStore

from relay.analytic import planner
from relay.analytic.footprint import GB, check, config_of, footprint, measure, parameters
from relay.collectives import predict
from relay.device.fake.measure import memory
from relay.device.training.plans import lm_loss, tensor_parallel, vocab_parallel
from relay.errors import ConfigError
from relay.hardware.system import System
from relay.launch.cli import main
from relay.parallel import Parallel
from relay.workloads import analytic, llama, moe
from relay.workloads.analytic import causal_share

H100 = "h100"


@pytest.mark.parametrize("name", ["llama3-8b", "llama3-70b"])
@pytest.mark.parametrize("tp", [1, 8])
def test_block_activations_under_tensor_parallel_match_korthikanti(name, tp):
    """One block's saved activations on one device of a tp group, 2 samples, against Korthikanti
    et al.'s sbh(10 + 24/t + 5as/(ht)) adapted to Llama (analytic.llama_activations), within 10%."""
    c = llama.CONFIGS[name]
    got = measure(name, tp, 1, 2, H100).parts["dense"].activations
    assert got == pytest.approx(analytic.llama_activations(c, 2, tp), rel=0.10)
    if tp > 1:  # and the split really shrinks what a device holds
        assert got < 0.7 * measure(name, 1, 1, 2, H100).parts["dense"].activations


def test_moe_block_activations_match_the_formula_under_expert_parallel():
    """Mixtral's block, balanced routing: a device of an ep group runs as many (token, expert)
    pairs as one device alone, so its saved activations are the formula's at any ep."""
    c = moe.CONFIGS["mixtral-8x7b"]
    for ep in (1, 4):
        got = measure("mixtral-8x7b", 1, ep, 1, H100).parts["moe"].activations
        assert got == pytest.approx(analytic.moe_gqa_activations(c, 1), rel=0.10)
    whole, split = (parameters("mixtral-8x7b", 1, ep).parts["moe"] for ep in (1, 4))
    assert split.expert_params == pytest.approx(whole.expert_params / 4, rel=1e-6)


def test_parameters_and_optimizer_are_zero_s_16_bytes_per_parameter_divided_by_the_plan():
    """ZeRO (Rajbhandari et al. 2020): bf16 weights and gradients + fp32 master weights and Adam
    moments = 2 + 2 + 12 bytes per parameter; DDP holds them all, ZeRO-3 / FSDP a 1/dp share
    (plus, here, the one block being gathered); a pipeline stage about 1/pp of them."""
    n = parameters("llama3-70b", 1, 1).parts
    total = n["base"].params + 80 * n["dense"].params
    assert total / 1e9 == pytest.approx(70.6, rel=0.005)
    ddp = footprint("llama3-70b", Parallel(dp=8), 8, H100)
    assert ddp.parameters + ddp.gradients + ddp.optimizer == pytest.approx(16 * total, rel=0.01)
    fsdp = footprint("llama3-70b", Parallel(dp=64, fsdp=True), 64, H100)
    assert fsdp.optimizer == pytest.approx(12 * total / 64, rel=0.01)
    assert fsdp.parameters == pytest.approx(2 * total / 64 + 2 * n["dense"].params, rel=0.01)
    stage = footprint("llama3-70b", Parallel(dp=2, pp=4, microbatches=4), 8, H100)
    assert stage.optimizer == pytest.approx(12 * total / 4, rel=0.10)


def test_fsdp_shards_experts_over_the_replicas_that_hold_them():
    """Under expert parallelism a layer's experts are held by the dp / ep replicas of one expert
    index, and FSDP2 shards them over those (plans.py); the rest over all dp replicas."""
    n = parameters("deepseek-v3", 1, 8).parts
    experts = 58 * n["moe"].expert_params  # one device's routed experts: 32 per MoE layer
    rest = n["base"].params + 3 * n["dense"].params + 58 * (n["moe"].params - n["moe"].expert_params)
    fp = footprint("deepseek-v3", Parallel(dp=72, ep=8, fsdp=True, recompute=True), 72, H100)
    assert fp.optimizer == pytest.approx(12 * (experts / 9 + rest / 72), rel=0.01)
    unsharded = footprint("deepseek-v3", Parallel(dp=72, ep=8, recompute=True), 72, H100)
    assert unsharded.optimizer == pytest.approx(12 * (experts + rest), rel=0.01)


def test_pipeline_and_recompute_activations_follow_korthikanti():
    """1F1B: the first stage holds pp microbatches of its L/pp layers, L layers' worth in all
    (Korthikanti et al. section 4.2.3); full recompute keeps 2sbh per layer (their 2sbhL) plus
    the layer being recomputed."""
    c = llama.CONFIGS["llama3-70b"]
    s, h = c.seq_len, c.dim
    plain = footprint("llama3-70b", Parallel(dp=2, tp=8, pp=4, microbatches=8), 16, H100)
    assert "stage 0" in plain.device
    assert plain.activations == pytest.approx(80 * analytic.llama_activations(c, 1, 8), rel=0.10)
    rc = footprint("llama3-70b", Parallel(dp=2, tp=8, pp=4, microbatches=8, recompute=True), 16, H100)
    assert rc.activations == pytest.approx(2 * s * h * 80 + analytic.llama_activations(c, 1, 8), rel=0.10)
    assert rc.activations < plain.activations / 5


def test_interleaved_1f1b_holds_korthikanti_s_share_more_activations():
    """Interleaved 1F1B, v chunks per rank: the first stage holds L (1 + (p - 1) / (p v)) layers'
    activations (Korthikanti et al. section 4.2.3), which torch's warm-up gives too: on pp=4,
    stages=2, 8 microbatches, (2 - 1) x 4 + 2 x 3 + 1 = 11 chunks of 10 layers, 80 x 11 / 8."""
    c = llama.CONFIGS["llama3-70b"]
    fp = footprint("llama3-70b", Parallel(dp=2, tp=8, pp=4, stages=2, microbatches=8), 16, H100)
    assert "stage 0 (embedding + 20 blocks)" in fp.device
    assert fp.activations == pytest.approx(80 * (1 + 3 / 8) * analytic.llama_activations(c, 1, 8), rel=0.10)


def test_memory_check_refuses_a_plan_that_does_not_fit_and_says_how():
    with pytest.raises(ConfigError) as e:
        check("llama3-70b", Parallel(dp=8), 8, H100)
    msg = str(e.value)
    for word in ("llama3-70b", "dp=8", "HBM", "80.0 GB", "optimizer", "activations", "fsdp", "recompute", "tp="):
        assert word in msg, word
    fp = check("llama3-8b", Parallel(dp=8, fsdp=True, recompute=True), 8, H100)
    assert fp.fits and fp.total < 80 * GB


def test_search_returns_only_valid_plans_that_fit_fastest_first():
    system = System(H100, 8, domain=8)
    found = planner.search(system, "llama3-8b", 16, top=1000, seq_len=2048)
    assert found.results and found.pruned_memory > 0
    assert len(found.results) == found.considered - found.pruned_memory
    every = list(planner.plans(system, "llama3-8b", 16, seq_len=2048))
    assert len(every) == found.considered
    over = [p for p in every if not footprint("llama3-8b", p, 16, H100, seq_len=2048).fits]
    assert len(over) == found.pruned_memory and not {r.plan for r in found.results} & set(over)
    c = llama.CONFIGS["llama3-8b"]
    for r in found.results:
        r.plan.check(8, 8, c, 16 // r.plan.dp)
        assert r.memory.fits and r.memory.total <= system.chip.hbm_bytes
        assert r.step_s == pytest.approx(r.breakdown.total) and 0 < r.mfu < 1
        assert r.tokens_per_s == pytest.approx(16 * 2048 / r.step_s)
    steps = [r.step_s for r in found.results]
    assert steps == sorted(steps)
    assert all(r.plan.fsdp or r.plan.tp > 1 or r.plan.pp > 1 for r in found.results)  # 16 B/param x 8B > 80 GB


def test_the_pipeline_bubble_is_positive_and_shrinks_with_microbatches():
    system = System(H100, 8, domain=8)
    few, many = (planner.cost(system, "llama3-8b", Parallel(dp=2, pp=4, microbatches=m), 32, seq_len=2048)
                 for m in (4, 16))
    assert few.breakdown.pipeline > 0 and many.breakdown.pipeline > 0
    assert many.breakdown.pipeline / many.step_s < few.breakdown.pipeline / few.step_s
    flat = planner.cost(system, "llama3-8b", Parallel(dp=8, fsdp=True), 32, seq_len=2048)
    assert flat.breakdown.pipeline == 0 and flat.breakdown.tensor_parallel == 0


def test_ranking_responds_to_the_fabric_and_the_device_count():
    """A slower scale-out exposes more data-parallel time across domains; tensor parallelism's
    all-reduces cost only when tp > 1; expert all-to-alls only when ep > 1; twice the devices
    give more tokens per second."""
    fast = System(H100, 16, domain=8)
    slow = System(H100, 16, domain=8, scaleout_gbps=0.5)
    plan = Parallel(dp=16, fsdp=True)
    a, b = (planner.cost(s, "llama3-8b", plan, 16, seq_len=2048) for s in (fast, slow))
    assert b.breakdown.data_parallel > a.breakdown.data_parallel and b.step_s > a.step_s
    tp = planner.cost(fast, "llama3-8b", Parallel(dp=8, tp=2, fsdp=True), 16, seq_len=2048)
    assert tp.breakdown.tensor_parallel > 0 == a.breakdown.tensor_parallel
    moe_sys = System(H100, 8)
    ep = planner.cost(moe_sys, "moe-debug", Parallel(dp=8, ep=4), 32)
    assert ep.breakdown.expert_all_to_all > 0
    assert planner.cost(moe_sys, "moe-debug", Parallel(dp=8), 32).breakdown.expert_all_to_all == 0
    best = [planner.search(System(H100, n, domain=8), "llama3-8b", 32, top=1, seq_len=2048).results[0]
            for n in (8, 16)]
    assert best[1].tokens_per_s > best[0].tokens_per_s


def test_causal_convention_halves_the_attention_term():
    # llama3-70b at 8K: 6 N T + 12 L s d T; causal keeps 6 L s d T of the attention term
    c = config_of("llama3-70b")
    full = analytic.llama_flops(c, 1)
    attn = 12 * c.n_layers * c.seq_len * c.dim
    assert causal_share(c) == pytest.approx((full - attn / 2) / full)
    assert 1.05 < 1 / causal_share(c) < 1.1  # the MFU conventions differ by about 7% here
    d = config_of("deepseek-v3")  # MLA: attention at head size qk_nope + qk_rope
    mla = 12 * d.n_layers * d.seq_len * d.n_heads * (d.qk_nope_dim + d.qk_rope_dim)
    assert causal_share(d) == pytest.approx(1 - mla / 2 / analytic.moe_flops(d, 1))


def test_relay_plan_prints_the_best_plans_with_units(capsys):
    assert main(["plan", "--chip", "h100", "--devices", "8", "--workload", "llama-debug", "--top", "3",
                 "--global-batch", "64"]) == 0
    out = capsys.readouterr().out
    assert "emulated s" in out and "GB per device" in out and "tokens/s" in out and "MFU" in out
    # both MFU conventions, labelled; the causal one smaller by the attention term's half
    assert "MFU, full attn." in out and "MFU, causal" in out and "causal halves the attention term" in out
    first = next(line.split() for line in out.splitlines() if line.startswith("1 "))
    full, causal = float(first[5]), float(first[6])
    share = causal_share(config_of("llama-debug"))
    assert causal <= full and causal == pytest.approx(full * share, abs=0.06)
    assert "valid plans considered" in out and "pruned by memory" in out and "real s" in out
    assert out.count("\n1 ") + out.count("\n1  ") >= 1 and "\n3 " in out


def test_relay_plan_refuses_a_plan_over_the_hbm(capsys):
    rc = main(["plan", "--chip", "h100", "--devices", "8", "--workload", "llama3-70b", "--parallel", "dp=8"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "HBM" in err and "GB" in err and "recompute" in err


def test_virtual_stages_cut_the_bubble_and_multiply_the_p2p():
    """Interleaved 1F1B with v virtual stages (Narayanan et al. 2021): a v-th of the bubble
    ((pp - 1) x the slowest microbatch), v times the stage-to-stage messages."""
    system = System("h100", 8, domain=8)
    pipe = {v: planner.cost(system, "llama3-8b", Parallel(dp=2, pp=4, microbatches=8, stages=v), 16,
                            seq_len=2048).breakdown.pipeline for v in (None, 2, 4)}
    bubble, p2p = (2 * (2 * pipe[None] - pipe[2]) / 3, (2 * pipe[2] - pipe[None]) / (3 * 8))  # from v = 1, 2
    assert bubble > 0 and p2p > 0
    assert pipe[4] == pytest.approx(bubble / 4 + 4 * 8 * p2p, rel=1e-9)


def test_relay_plan_costs_what_the_plan_model_models(capsys):
    assert main(["plan", "--chip", "h100", "--devices", "8", "--workload", "llama3-8b", "--parallel",
                 "dp=2,pp=4,stages=2,microbatches=8", "--global-batch", "16", "--seq-len", "2048"]) == 0
    assert "dp=2,pp=4,microbatches=8,stages=2" in capsys.readouterr().out
    assert main(["plan", "--chip", "h100", "--devices", "4", "--workload", "llama-debug", "--parallel",
                 "dp=2,tp=2,sp"]) == 0
    assert "sp: the norms and residual adds on 1 / tp of the sequence" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:Full backward hook")  # the token ids need no gradient
def test_tensor_parallel_all_reduces_are_those_dtensor_runs_for_the_plan():
    """The planner's tensor-parallel charge is one all-reduce per collective that plans.py's
    plan really issues (counted by CommDebugMode on torch's fake process group, no Ray): for
    llama-debug, 2 forward and 5 backward per block, each of the block's activation; exposed, the
    forward ones and the last backward one of attention's 3 and of the SwiGLU's 2. The vocabulary
    split over tp: the embedding's output forward, the head's input gradient backward and the
    loss's 3 of one fp32 number per token, all exposed; each device holds vocab / 2 rows."""
    c = llama.CONFIGS["llama-debug"]
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        model, mesh = llama.build(c), init_device_mesh("cpu", (2,))
        tensor_parallel(model.blocks, mesh, 2)
        vocab_parallel(model, mesh)
        assert model.tok.weight.to_local().shape == model.head.weight.to_local().shape == (c.vocab_size // 2, c.dim)
        idx = torch.randint(0, c.vocab_size, (2, c.seq_len))
        with CommDebugMode() as comms, loss_parallel():
            lm_loss(model(idx), idx).backward()
        issued = sum(comms.get_comm_counts().values())
    finally:
        dist.destroy_process_group()
    assert issued == 7 * c.n_layers + 2 + 3
    r = planner.cost(System(H100, 2), "llama-debug", Parallel(tp=2), 2)
    one = predict("all_reduce", "auto", 2 * c.seq_len * c.dim * 2, System(H100, 2))
    loss = predict("all_reduce", "auto", 4 * 2 * c.seq_len, System(H100, 2))
    assert r.breakdown.tensor_parallel == pytest.approx((4 * c.n_layers + 2) * one + 3 * loss, rel=1e-6)


def test_tensor_parallel_splits_the_vocabulary_of_embedding_head_and_loss():
    """measure's base (embedding, final norm, head, loss) at tp = 2 is one device's share: vocab / 2
    rows of the embedding and the head (2 V d / 2 + d parameters, by hand) and about half the
    seconds (the head's GEMMs and the loss on vocab / 2 logits; the embedding's output and the
    norm stay whole), as plans.vocab_parallel splits it; the memory check holds that share."""
    c = config_of("llama3-8b", 2048)
    one, two = (measure("llama3-8b", tp, 1, 1, H100, seq_len=2048).parts["base"] for tp in (1, 2))
    assert (one.params, two.params) == (2 * c.vocab_size * c.dim + c.dim, c.vocab_size * c.dim + c.dim)
    assert parameters("llama3-8b", 2, 1, 2048).parts["base"].params == two.params
    for f in ("forward_s", "backward_s"):
        assert 0.5 < getattr(two, f) / getattr(one, f) < 0.55
    block = parameters("llama3-8b", 2, 1, 2048).parts["dense"].params
    fp = footprint("llama3-8b", Parallel(tp=2), 1, H100, seq_len=2048)
    assert fp.parameters == 2 * (two.params + c.n_layers * block)  # bf16


@pytest.mark.parametrize("name", ["llama-debug", "moe-debug"])
def test_one_device_footprint_equals_the_whole_model_measured_on_fake_tensors(name):
    """Without a split, the per-block measurement adds up to fake.memory's figures for the whole
    model, exactly: blocks of a kind are identical."""
    whole = memory(name, 4)
    fp = footprint(name, Parallel(), 4, H100)
    assert fp.activations == whole["activations"]
    assert (fp.parameters, fp.gradients, fp.optimizer) == (whole["parameters"], whole["gradients"], whole["optimizer"])


def test_relay_plan_confirm_refuses_bad_input_before_any_device(capsys):
    base = ["plan", "--chip", "h100", "--devices", "4", "--workload", "llama-debug", "--global-batch", "16"]
    assert main([*base, "--confirm", "-1"]) == 2
    assert "--confirm = -1" in capsys.readouterr().err
    assert main([*base, "--confirm", "1", "--parallel", "dp=4"]) == 2
    assert "not with --parallel" in capsys.readouterr().err
    assert main([*base, "--confirm", "1", "--seq-len", "16"]) == 2
    assert "--seq-len = 16" in capsys.readouterr().err


def test_the_blocks_are_measured_as_gpu_trainers_hold_them_or_as_relays_runs_do():
    """model_dtype "emulated" (the default): the block in bf16, its fp32 upcasts (RMSNorm, rotary,
    loss) charged at 4 bytes, so it costs more than the same block held in fp32 with every float at
    the emulated dtype, as Relay's runs hold it ("fp32", what tests/ray/test_plan_search.py compares
    the runs with); on llama-debug the parameters and saved bytes are the same, and an unknown
    model_dtype is refused before anything is measured."""
    gpu, runs = (measure("llama-debug", 1, 1, 4, H100, model_dtype=m).parts for m in ("emulated", "fp32"))
    for kind in ("dense", "base"):
        assert gpu[kind].forward_s > runs[kind].forward_s and gpu[kind].backward_s > runs[kind].backward_s
        assert gpu[kind].params == runs[kind].params and gpu[kind].activations == runs[kind].activations
    with pytest.raises(ConfigError, match="model_dtype = 'fp64'"):
        planner.cost(System(H100, 4), "llama-debug", Parallel(dp=4), 16, model_dtype="fp64")


def test_fsdp2_prefetch_timeline_by_hand():
    """overlap.fsdp_microbatch on three blocks (forward 2, backward 4, gather 1, reduce-scatter 1,
    no root): forward, each gather waits for the block before to start, so only the first is
    exposed (1); backward, the last block's gather follows the forward (exposed, 1), each next
    one is prefetched as a block starts, and the last reduce-scatter ends after the compute (1)."""
    from relay.analytic.overlap import fsdp_microbatch
    assert fsdp_microbatch([2.0] * 3, [4.0] * 3, [1.0] * 3, [1.0] * 3, (0.0, 0.0), (0.0, 0.0)) == 21.0  # 18 + 3
    # slow gathers (3 > a forward of 2): the lane, not the compute, sets the pace
    assert fsdp_microbatch([2.0] * 3, [4.0] * 3, [3.0] * 3, [1.0] * 3, (0.0, 0.0), (0.0, 0.0)) == 27.0  # 18 + 9


def test_relay_plan_costs_deepeps_dispatch_where_asked_and_refuses_what_cannot_go_with_it(capsys):
    """--dispatch deepep: the expert all-to-all as DeepEP's kernels send it (uniform routing: fewer
    copies crossing the nodes than a copy per expert), the rest of the step the same; refused with
    --confirm and a skewed --routing, whose runs and hot experts send the runs' all-to-all."""
    base = ["plan", "--chip", "h100", "--devices", "16", "--domain", "4", "--workload", "mixtral-8x7b",
            "--parallel", "dp=16,ep=8,fsdp,recompute", "--global-batch", "16", "--seq-len", "4096"]  # EP 8 over 2 nodes
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "all_to_all expert dispatch" in out
    plain = next(x for x in out.splitlines() if x.startswith("1 ")).split()
    assert main(base + ["--dispatch", "deepep"]) == 0
    out = capsys.readouterr().out
    assert "deepep expert dispatch" in out
    deep = next(x for x in out.splitlines() if x.startswith("1 ")).split()
    a2a = -5  # the expert all-to-all column (emulated s), before data parallel and the memory's "x / y"
    assert float(deep[a2a]) < float(plain[a2a]) and deep[-8:-5] == plain[-8:-5]
    assert main(base + ["--dispatch", "deepep", "--routing", "zipf:0.2"]) == 2
    assert "--dispatch = 'deepep' with --routing" in capsys.readouterr().err
    search = ["plan", "--chip", "h100", "--devices", "4", "--workload", "moe-debug", "--dispatch", "deepep"]
    assert main(search + ["--confirm", "1"]) == 2
    assert "drop --dispatch or --confirm" in capsys.readouterr().err
