"""Memory per device under a parallel plan, at full size, checked against the chip's HBM before
anything runs; and the per-block figures (emulated seconds, saved activations, parameters) that
the memory check and the plan search (emulator/analytic/planner.py) are built from.

Measured, not assumed: `measure` runs models of 0 and 1 block of each kind (dense, MoE) on fake
tensors, each through one call, device/fake/measure.py's `measure_block` (its `by_layers` method:
every block of a kind is identical, so a block's figure is the 1-block model's minus the 0-block
model's, exactly), with the block split as the plan splits it on one device (`shard` and
`split_heads`: Megatron tensor parallel divides the heads, the dense SwiGLU's width and the
vocabulary of the embedding, head and loss by tp and leaves norms, routers and experts whole, as
plans.py does; expert parallel keeps n_experts / ep experts). Each run charges every aten op by
the cost model (forward, backward and optimizer step separately) and records what autograd saves
(measure.memory's rule), at the plan's own micro-batch size (fake tensors cost the same at any
size: a 70B block takes well under a second), cached per shard and size.

Closed forms, on top of the measured blocks (`footprint`): which blocks, embedding and head a
pipeline stage holds, how many microbatches of activations 1F1B keeps in flight on it (pp - stage,
at most the microbatches; interleaved 1F1B, `stages` = v chunks per rank: torch's warm-up count,
(v - 1) x the microbatches of a round + 2 (pp - 1 - stage), plus one, chunks of 1 / v of the
rank's blocks, at most v x the microbatches), activation checkpointing and sequence parallel
(activations.py; under sp the blocks are measured on the sequence's shard, sequence_parallel.py),
FSDP (parameters, gradients and optimizer state divided by the replicas, experts by the dp / ep
replicas that hold them, plus one block gathered whole; with gradient accumulation each
microbatch reduce-scatters, as torchtitan runs it; under a pipeline the stage's parameters and
gradients are held unsharded, as torch's pipelining runs FSDP2 between the first backward and
the reduce-scatter after the schedule), the distributed optimizer (`dist_opt`: optimizer state
alone divided so), and the 2 + 2 + 12 bytes per parameter of bf16 mixed-precision AdamW (ZeRO,
Rajbhandari et al. 2020). Gradient accumulation without a pipeline holds one microbatch's
activations. Units: bytes in the figures, GB (1e9 bytes) where printed.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, replace

import torch
from torch import nn

from relay.analytic import activations
from relay.analytic.sequence_parallel import shard_sequence
from relay.device.fake.measure import check_model_dtype, measure_block
from relay.errors import ConfigError
from relay.hardware import chips
from relay.kernels.attention import IMPLEMENTATIONS as ATTENTIONS
from relay.kernels.cost import ITEMSIZE
from relay.kernels.fusion import MODES as FUSIONS
from relay.parallel import Parallel
from relay.trainer import OPTIMIZER_BYTES
from relay.workloads import get as get_workload
from relay.workloads.moe import MLA

GB = 1e9  # printed figures are GB (1e9 bytes), the catalog's unit of HBM
KINDS = ("base", "dense", "moe")  # base: the model without blocks (embedding, norm, head, loss)


@dataclass(frozen=True)
class Part:
    """One piece of the model on one device, at one micro-batch of `micro_batch` samples."""

    forward_s: float  # emulated seconds of its forward pass
    backward_s: float  # emulated seconds of its backward pass
    optimizer_s: float  # emulated seconds of its optimizer step
    activations: float  # bytes autograd saves in its forward pass
    params: int  # parameters this device holds of it
    expert_params: int  # of which experts' (synchronised and sharded over dp / ep replicas, not dp)
    ac_saved_s: float = 0.0  # forward seconds of the ops selective (op) checkpointing keeps (blockops.py)
    ac_saved_bytes: float = 0.0  # bytes of their outputs
    norm_bytes: float = 0.0  # of `activations`, what the norms save (the block's two: a 1 / tp share under sp)
    weight_cast_s: float = 0.0  # of forward_s + backward_s, FP8 weight casts a fused run makes once a step

    def __sub__(self, o: Part) -> Part:
        return Part(*(getattr(self, f) - getattr(o, f) for f in Part.__dataclass_fields__))

    def __add__(self, o: Part) -> Part:
        return Part(*(getattr(self, f) + getattr(o, f) for f in Part.__dataclass_fields__))


@dataclass(frozen=True)
class Measured:
    """Per kind (KINDS), what one device's share of it costs, measured at `micro_batch` samples."""

    parts: dict  # kind -> Part (a block's figures for "dense" and "moe"; the rest for "base")
    micro_batch: int  # samples per micro-batch it was measured at


def shard(config, tp: int = 1, ep: int = 1):
    """The configuration of one device's share of a block's feed-forward and of the vocabulary under
    tensor and expert parallelism, as plans.py splits them (the heads: `split_heads`).
    Expert parallelism keeps n_experts / ep experts per device, each fed by the ep replicas of
    its group: with balanced routing, the same k expert passes per token as on one device, so
    the shard keeps top_k and at least top_k experts (the FLOPs are those of the real split;
    fewer, larger expert GEMMs when n_experts / ep < top_k; the router keeps as many outputs as
    the shard has experts, a fraction of a percent of the block)."""
    changes = {"ffn_dim": config.ffn_dim // tp, "vocab_size": config.vocab_size // tp}
    if hasattr(config, "n_experts"):
        changes["n_experts"] = max(config.n_experts // ep, config.top_k)
    return replace(config, **changes)


def split_heads(model, tp: int):
    """Each block's attention with n_heads / tp heads (and key/value heads) of the same size, as
    plans.tensor_parallel leaves it on one device (the low-rank latents of MLA stay whole)."""
    if tp == 1:
        return model
    for block in model.blocks:
        a = block.attn
        if isinstance(a, MLA):
            c = a.c = replace(a.c, n_heads=a.c.n_heads // tp)
            a.wq_b = nn.Linear(c.q_lora_rank, c.n_heads * a.qk_dim, bias=False)
            a.wkv_b = nn.Linear(c.kv_lora_rank, c.n_heads * (c.qk_nope_dim + c.v_head_dim), bias=False)
            a.wo = nn.Linear(c.n_heads * c.v_head_dim, c.dim, bias=False)
        else:
            a.n_heads, a.n_kv_heads, d = a.n_heads // tp, a.n_kv_heads // tp, a.wq.in_features
            a.wq = nn.Linear(d, a.n_heads * a.head_dim, bias=False)
            a.wo = nn.Linear(a.n_heads * a.head_dim, d, bias=False)
            a.wk, a.wv = (nn.Linear(d, a.n_kv_heads * a.head_dim, bias=False) for _ in range(2))
    return model


def _workload(workload: str, config, tp: int, n_layers: int, dense: int, sp: bool = False):
    """The named workload built from `config` with n_layers blocks (the first `dense` of them
    dense), the heads split tp ways; sp: the residual stream on 1 / tp of the sequence."""
    family = importlib.import_module(type(config).__module__)
    extra = {"n_dense_layers": dense} if hasattr(config, "n_dense_layers") else {}
    wl = family.workload(workload, replace(config, n_layers=n_layers, **extra))
    split = (lambda m: shard_sequence(split_heads(m, tp), tp)) if sp else (lambda m: split_heads(m, tp))
    return replace(wl, build_model=lambda: split(wl.build_model()))


def measure(workload: str, tp: int, ep: int, micro_batch: int, chip: str, *, dtype: str = "bf16",
            optimizer: str = "adamw", seq_len: int | None = None, fusion: str = "eager", attention="sdpa",
            sp: bool = False, model_dtype: str = "emulated") -> Measured:
    """One device's share of each kind of part of `workload` under tensor parallel `tp` (and
    sequence parallel `sp`) and expert parallel `ep`, on fake tensors at `micro_batch` samples
    (cached; model_dtype: measure_block's). A MoE block's attention splits by tp and its experts by
    ep, independently, and its figures are sums over its ops, so for tp > 1 it is measured once per
    ep at tp = 1 and its attention swapped: + (dense block with only the heads split by tp) - (the
    same at tp = 1). Exact, and a full-size MoE block (256 experts) is what takes seconds."""
    c = config_of(workload, seq_len)  # (a dense block holds no experts: measured at ep = 1, shared by every ep)
    kernels = check_fusion(fusion, attention, model_dtype)  # how the kernels run, for measure_block
    parts = dict(_measure(workload, shard(c, tp, 1), tp, micro_batch, chip, dtype, optimizer, ("dense",), kernels, sp))
    if hasattr(c, "n_experts"):
        moe = _measure(workload, shard(c, 1, ep), 1, micro_batch, chip, dtype, optimizer, ("moe",), kernels)["moe"]
        if tp > 1:
            split, whole = (_measure(workload, c, t, micro_batch, chip, dtype, optimizer, ("dense",), kernels,
                                     sp and t > 1)["dense"] for t in (tp, 1))
            moe = moe + split - whole
        parts["moe"] = _per_expert_share(c, ep, moe)
    return Measured(parts, micro_batch)


def _per_expert_share(c, ep: int, moe: Part) -> Part:
    """A MoE block's figures with the parameters (and optimizer step) of n_experts / ep experts:
    the shard keeps top_k experts when n_experts / ep < top_k (see `shard`)."""
    k = c.n_experts / ep / shard(c, 1, ep).n_experts
    if k == 1:
        return moe
    kept = moe.params - moe.expert_params * (1 - k)
    return replace(moe, params=round(kept), expert_params=round(moe.expert_params * k),
                   optimizer_s=moe.optimizer_s * kept / moe.params)


@functools.cache
def parameters(workload: str, tp: int, ep: int, seq_len: int | None = None) -> Measured:
    """Like `measure`, with the parameters alone (counted on the meta device, no fake run: a
    lower bound of the memory that prunes most plans before any measurement)."""
    c = config_of(workload, seq_len)

    def count(n_layers: int, dense: int) -> Part:
        with torch.device("meta"):
            model = _workload(workload, shard(c, tp, ep), tp, n_layers, dense).build_model()
        experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        return Part(0.0, 0.0, 0.0, 0.0, sum(p.numel() for p in model.parameters()), experts)

    base = count(0, 0)
    parts = {"base": base, "dense": count(1, 1) - base}
    if hasattr(c, "n_experts"):
        parts["moe"] = _per_expert_share(c, ep, count(1, 0) - base)
    return Measured(parts, 1)


@functools.cache
def _measure(workload: str, config, tp: int, micro_batch: int, chip: str, dtype: str, optimizer: str,
             kinds: tuple, kernels: tuple = ("eager", "sdpa", "emulated"), sp: bool = False) -> dict:
    """{"base": the model without blocks, kind: one block of each of `kinds`} (by_layers' method)."""
    def run(n_layers: int, dense: int) -> Part:
        return _run(_workload(workload, config, tp, n_layers, dense, sp and tp > 1), micro_batch, chips.get(chip),
                    dtype, optimizer, kernels)

    whole = replace(config_of(workload, config.seq_len), vocab_size=config.vocab_size)  # (the base: once per vocab)
    base = run(0, 0) if not kinds else _measure(workload, whole, 1, micro_batch, chip, dtype, optimizer, (),
                                                kernels)["base"]
    out = {"base": base}
    for kind in kinds:
        out[kind] = run(1, 1 if kind == "dense" else 0) - base
    return out


def _run(wl, micro_batch: int, chip, dtype: str, optimizer: str, kernels: tuple) -> Part:
    b = measure_block(wl, micro_batch, chip, dtype, optimizer, *kernels)  # (fusion, attention, model_dtype)
    return Part(b.forward_s, b.backward_s, b.optimizer_s, b.activations, b.params, b.expert_params, b.ac_saved_s,
                b.ac_saved_bytes, b.norm_bytes, b.weight_cast_s)


@dataclass(frozen=True)
class Footprint:
    """Bytes the most loaded device of a plan holds at its peak, and what it is."""

    device: str  # which device: e.g. "pipeline stage 0 (embedding + 20 blocks)"
    parameters: float  # bytes, at the emulated dtype
    gradients: float  # bytes, at the emulated dtype
    optimizer: float  # bytes: fp32 master weights and AdamW's two moments (12 per parameter)
    activations: float  # bytes saved for backward at the peak (microbatches in flight)
    capacity: float  # the chip's HBM, bytes

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def describe(self) -> str:
        g = lambda x: f"{x / GB:.1f} GB"  # noqa: E731
        return (f"{self.device}: parameters {g(self.parameters)} + gradients {g(self.gradients)} + optimizer "
                f"{g(self.optimizer)} + activations {g(self.activations)} = {g(self.total)} of "
                f"{g(self.capacity)} HBM")


def check_fusion(fusion, attention: str = "sdpa", model_dtype: str = "emulated") -> tuple:
    """(fusion, attention, model_dtype), or a ConfigError for one the cost model lacks, before any measurement."""
    check_model_dtype(model_dtype)
    if attention not in ATTENTIONS:
        raise ConfigError(f"attention = {attention!r} is unknown; choose one of {', '.join(ATTENTIONS)} ('sdpa': "
                          "PyTorch's flash backend, FlashAttention-2; 'cudnn': cuDNN, as Transformer Engine runs it)")
    if fusion not in FUSIONS:
        raise ConfigError(f"fusion = {fusion!r} is unknown; choose 'eager' (a kernel per aten op, as eager PyTorch "
                          "runs) or 'fused' (memory-bound op chains as one kernel, as Megatron-LM with Transformer "
                          "Engine or torch.compile runs them)")
    return fusion, attention, model_dtype


def config_of(workload, seq_len: int | None = None):
    """The workload's model configuration (with another sequence length if given)."""
    c = get_workload(workload).config
    if c is None or not hasattr(c, "n_layers"):
        raise ConfigError(f"workload = {workload!r} has no transformer configuration; the memory model and "
                          "the plan search take the language models (llama3-70b, deepseek-v3, llama-debug, ...)")
    if seq_len is None:
        return c
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len = {seq_len!r} is invalid; give tokens per sample >= 1 (or leave it out for the "
                          f"model's own, {c.seq_len})")
    return replace(c, seq_len=seq_len)


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """The blocks pipeline stage `stage` holds: contiguous, as even as can be (plans.stage_of)."""
    lo, hi = n_layers * stage // pp, n_layers * (stage + 1) // pp
    return range(lo, hi)


def rank_layers(n_layers: int, plan: Parallel, rank: int) -> list[int]:
    """The blocks pipeline rank `rank` holds: its stage's, or with `stages` its chunks rank,
    rank + pp, ... of pp x stages (plans.chunks_of)."""
    n = plan.pp * plan.n_stages
    return [i for chunk in range(rank, n, plan.pp) for i in stage_layers(n_layers, n, chunk)]


def in_flight(plan: Parallel, rank: int) -> float:
    """Microbatches of the rank's blocks whose activations are held at its peak: 1F1B's
    pp - rank; interleaved, torch's warm-up chunks plus one (ScheduleInterleaved1F1B's
    _get_warmup_ops), each 1 / stages of the rank's blocks."""
    m, v = plan.n_microbatches, plan.n_stages
    if v == 1:
        return min(plan.pp - rank, m)
    per_round = m // max(1, m // plan.pp)
    return min((v - 1) * per_round + 2 * (plan.pp - 1 - rank) + 1, m * v) / v


def footprint(workload: str, plan: Parallel, global_batch: int, chip, *, dtype: str = "bf16",
              optimizer: str = "adamw", seq_len: int | None = None, measured: Measured | None = None,
              fusion: str = "eager", attention: str = "sdpa", regather: bool = False, cp: int = 1,
              model_dtype: str = "emulated") -> Footprint:
    """The most loaded device's memory under `plan` for `global_batch` samples (module docstring);
    regather: Megatron's sequence parallel (activations.py); cp: CP ranks one device stands for
    (their parameters the same: FSDP and the distributed optimizer shard over dp x cp)."""
    chip = chips.get(chip)
    chip.peak_flops(dtype)  # a precision the chip lacks (fp8 on an A100): refused before anything is measured
    c = config_of(workload, seq_len)
    replica = global_batch // plan.dp
    m = plan.n_microbatches
    mb = max(replica // m, 1)
    meas = measured or measure(workload, plan.tp, plan.ep, mb, chip.name, dtype=dtype, optimizer=optimizer,
                               seq_len=seq_len, fusion=fusion, attention=attention, sp=plan.sp, model_dtype=model_dtype)
    size, opt_bytes = ITEMSIZE[dtype], OPTIMIZER_BYTES[optimizer]
    dense = getattr(c, "n_dense_layers", c.n_layers)
    best = None
    for stage in sorted({0, plan.pp - 1}):
        layers = rank_layers(c.n_layers, plan, stage)
        kinds = ["dense" if i < dense else "moe" for i in layers]
        blocks = [meas.parts[k] for k in kinds]
        base = meas.parts["base"]
        # the embedding on stage 0, the head on the last: half the base's parameters each (the same size)
        share = (0.5 if stage == 0 else 0) + (0.5 if stage == plan.pp - 1 else 0)
        params = sum(b.params for b in blocks) + base.params * share
        experts = sum(b.expert_params for b in blocks)
        # FSDP (ZeRO-1: its state alone) shards experts over the dp / ep replicas holding them, the rest over dp
        shard = ((params - experts) / plan.dp + experts / plan.dp_outer) / cp
        sharded = shard if plan.fsdp else params
        gathered = max((b.params for b in blocks), default=0) if plan.fsdp else 0  # one block gathered whole
        if plan.fsdp and plan.pp > 1:
            # torch's pipelining leaves each FSDP2 unit unsharded from its first backward on, its gradients
            # unsharded too, until the reduce-scatter after the last microbatch (stage.py:
            # backward_maybe_with_nosync, perform_reduce_grad): the stage's blocks all gathered at the peak
            gathered = params
        # checkpointing and sequence parallel: activations.py (a block's input is s b d)
        act = activations.kept(plan, blocks, in_flight(plan, stage), size * mb * c.seq_len * c.dim, regather)
        act += base.activations if stage == plan.pp - 1 else 0  # logits and loss (the embedding's output is small)
        what = " + ".join(x for x in ("embedding" if stage == 0 else "", f"{len(blocks)} blocks",
                                      "head" if stage == plan.pp - 1 else "") if x)
        # (FSDP2 accumulates into the shards: each microbatch reduce-scatters; under a pipeline unsharded)
        grads = params if plan.fsdp and plan.pp > 1 else sharded + gathered
        if stage == 0 and plan.tp > 1:  # DTensor's embedding backward makes the whole vocabulary's (plans._own_rows)
            grads += (plan.tp - 1) * base.params / 2
        states = shard if plan.dist_opt else sharded
        fp = Footprint(f"pipeline stage {stage} ({what})" if plan.pp > 1 else f"every device ({what})",
                       (sharded + gathered) * size, grads * size, states * opt_bytes, act, chip.hbm_bytes)
        best = fp if best is None or fp.total > best.total else best
    return best


def fitting(workload: str, plan: Parallel, global_batch: int, chip, **kw) -> Footprint | None:
    """The plan's footprint when it fits in the chip's HBM, else None, as the plan searches prune:
    the parameters alone (counted, no fake run) rule out most plans; then one measurement per (tp,
    ep, microbatch), cached, serves every plan that shares it. kw: footprint's (dtype ... model_dtype)."""
    if not footprint(workload, plan, global_batch, chip, **kw,
                     measured=parameters(workload, plan.tp, plan.ep, kw.get("seq_len"))).fits:
        return None
    mb = global_batch // plan.dp // plan.n_microbatches
    measured = measure(workload, plan.tp, plan.ep, mb, chip, **kw, sp=plan.sp)
    fp = footprint(workload, plan, global_batch, chip, **kw, measured=measured)
    return fp if fp.fits else None


def check(workload: str, plan: Parallel, global_batch: int, chip, **kw) -> Footprint:
    """The plan's footprint, or a ConfigError naming the device, the breakdown, the capacity and
    the ways to fit, when its peak exceeds the chip's HBM."""
    fp = footprint(workload, plan, global_batch, chip, **kw)
    if not fp.fits:
        fixes = ["more tensor or pipeline parallelism (tp=, pp=)", "fsdp" if not plan.fsdp else "",
                 "recompute (or the selective ac=op)" if plan.ac is None else "recompute" if not plan.recompute else "",
                 "more microbatches (with pp = 1: gradient accumulation)", "a smaller --global-batch"]
        raise ConfigError(f"memory: {workload} under {plan} at global batch {global_batch} does not fit the "
                          f"{chips.get(chip).name}'s HBM ({fp.capacity / GB:.1f} GB): {fp.describe()}; "
                          f"try {', '.join(f for f in fixes if f)}")
    return fp
