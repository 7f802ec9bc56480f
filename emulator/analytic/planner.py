"""The plan search behind `relay plan`: every parallel plan (dp, fsdp, tp, pp, ep, microbatches
with or without a pipeline, activation checkpointing) of a language model, pruned by memory
(emulator/analytic/footprint.py), ranked by an analytic emulated step time built from the
project's own cost models. Fast (no device runs): fake-tensor block measurements, then arithmetic.

The step of the slowest pipeline stage, all figures emulated seconds:

    per microbatch   t = compute (forward + backward, + forward again with recompute: the
                     fake-tensor measurement of the stage's blocks and its share of the
                     embedding and head, vocab / tp of them under tp) + tensor parallel
                     + expert all-to-all + pipeline p2p
    pipeline         1F1B: (m + pp - 1) x t_max; the bubble is (pp - 1) x t_max (/ v, v times the
                     p2p, with v virtual stages: Narayanan et al. 2021), (pp - 1) / m of the work
    data parallel, optimizer   as plans.py runs them (`_data_parallel`, `_optimizer`: measured)

Collectives are `predict` closed forms on each group's own System (`group_of`: a group inside
one scale-up domain runs on its links), algorithm "auto" (the vendor library's choice):
    tensor parallel  Megatron's pairing as plans.py applies it through DTensor: per block and
                     microbatch, an all-reduce of the block's activation (s b d) after attention
                     and after the dense SwiGLU forward (experts are not split); in backward one
                     per column-wise layer, the last of each group exposed; and the vocabulary
                     split: the embedding's output on stage 0, the head's input gradient and
                     loss_parallel's 3 small ones on the last (analytic/tensor_parallel.py)
    expert parallel  per MoE layer and microbatch, 2 all-to-alls forward (dispatch, combine) and
                     2 backward of each device's k s b d routed tokens, balanced routing, and
                     a small all-to-all of the token counts per forward pass; exposed
    pipeline p2p     each microbatch's activation forward and its gradient back, on the link
                     between neighbouring stages; exposed (`async_p2p`: only the bubble's chain)
Checked against fake-tensor runs of every plan on a small system (docs/design.md,
bench/plan_vs_runs.py): the runs' timelines set the overlaps and the *_KERNELS below.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, replace

import torch

from relay.analytic import accumulate, activations, deepep, megatron, tensor_parallel
from relay.analytic import footprint as footprints
from relay.analytic.footprint import Footprint, check_fusion, config_of, fitting, footprint, measure, stage_layers
from relay.analytic.overlap import fsdp_exposed
from relay.collectives import predict
from relay.collectives.fabric import Fabric
from relay.device.backend.collective import group_of
from relay.errors import ConfigError
from relay.hardware.system import System
from relay.kernels.cost import ITEMSIZE, CostModel
from relay.parallel import Parallel
from relay.trainer import TrainConfig
from relay.workloads import analytic

BUCKET_MB = TrainConfig.bucket_mb  # the runs' gradient buckets, MB (TrainConfig's default)
OPTIMIZER_OPS = {"adamw": 7, "sgd": 1}  # kernels per parameter tensor of relay.trainer.Optimizer.step
# Kernels the cost model charges (a launch each, plus the bytes they touch) besides the model's own
# ops, counted on llama-debug's aten ops with a TorchDispatchMode on the devices (docs/design.md):
FSDP_GATHER_KERNELS = 2  # per FSDP2 all-gather: copy-in, copy-out
FSDP_SCATTER_KERNELS = 1  # per reduce-scatter: chunk_cat
TOKENS_PER_STEP = 4 * 2 ** 20  # default global batch: about 4M tokens (a multiple of the devices)


@dataclass(frozen=True)
class Breakdown:
    """One step of the plan, emulated seconds, on its slowest pipeline stage."""

    compute: float  # forward, backward (and recompute) of the m microbatches, and the optimizer step
    tensor_parallel: float  # exposed tensor-parallel all-reduces
    pipeline: float  # the 1F1B bubble ((pp - 1) x the slowest microbatch) and the stages' p2p messages
    expert_all_to_all: float  # exposed expert-parallel all-to-alls
    data_parallel: float  # exposed gradient all-reduce, or FSDP all-gathers and reduce-scatters

    @property
    def total(self) -> float:
        return self.compute + self.tensor_parallel + self.pipeline + self.expert_all_to_all + self.data_parallel


@dataclass(frozen=True)
class PlanResult:
    """A plan of the search, with its emulated step and its memory."""

    plan: Parallel
    breakdown: Breakdown  # emulated seconds per part of the step
    memory: Footprint  # the most loaded device's bytes at its peak, and the HBM
    step_s: float  # emulated seconds per step
    tokens_per_s: float  # emulated tokens per second (global batch x sequence length / step)
    mfu: float  # model FLOPs (6 N T + attention; recompute not counted) / (step x system peak), 0..1
    micro_batch: int  # samples per microbatch


@dataclass(frozen=True)
class Search:
    """What `search` found and how much it looked at."""

    results: list  # the best PlanResults, fastest first
    considered: int  # valid plans enumerated
    pruned_memory: int  # of which did not fit in HBM
    global_batch: int  # samples per step
    host_s: float  # real seconds the search took


def default_batch(workload: str, devices: int, seq_len: int | None = None) -> int:
    """About TOKENS_PER_STEP tokens, rounded up to a multiple of the device count (so that any
    data-parallel degree divides it)."""
    c = config_of(workload, seq_len)
    want = max(TOKENS_PER_STEP // c.seq_len, 1)
    return -(-want // devices) * devices


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plans(system: System, workload: str, global_batch: int, seq_len: int | None = None):
    """Every plan that passes Parallel.check on `system` for `global_batch` samples, with
    microbatches of accumulate.MICRO_BATCHES samples (accumulate.microbatch_counts)."""
    c = config_of(workload, seq_len)
    n = system.devices
    for tp in _divisors(n):
        for pp in _divisors(n // tp):
            dp = n // (tp * pp)
            if global_batch % dp:
                continue
            replica = global_batch // dp
            experts = _divisors(dp) if hasattr(c, "n_experts") else [1]
            micro = accumulate.microbatch_counts(replica, pp)
            for ep in experts:
                for fsdp in (False, True) if dp > 1 else (False,):
                    for m in micro:
                        for ac in (None, "op", "full"):  # activation checkpointing
                            try:
                                p = Parallel(dp=dp, tp=tp, pp=pp, ep=ep, fsdp=fsdp, microbatches=m, ac=ac)
                                p.check(n, system.domain, c, replica)
                            except ConfigError:
                                continue
                            yield p


def search(system, workload: str, global_batch: int | None = None, devices: int | None = None, top: int = 5, *,
           seq_len: int | None = None, dtype: str = "bf16", optimizer: str = "adamw",
           message_bytes: int | None = None, fusion: str = "eager", attention: str = "sdpa",
           model_dtype: str = "emulated", dispatch: str = "all_to_all", routing: str = "uniform") -> Search:
    """The `top` fastest plans of `workload` on `system` (a System or a preset name, scaled to
    `devices` if given) that fit in memory, by emulated step time. message_bytes: bytes per
    element of every message (default: the emulated dtype's; real-mode plans move fp32, 4);
    dispatch and routing as `cost`."""
    start = time.perf_counter()
    system = System.preset(system) if isinstance(system, str) else system
    system = system.scaled(devices) if devices else system
    global_batch = default_batch(workload, system.devices, seq_len) if global_batch is None else global_batch
    for name, v in (("global_batch", global_batch), ("top", top), ("seq_len", 1 if seq_len is None else seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"plan search: {name} = {v!r} is invalid; give an integer >= 1")
    check_fusion(fusion, attention, model_dtype)  # (refused before any plan is measured)
    deepep.check(dispatch, routing)
    kw = dict(dtype=dtype, optimizer=optimizer, seq_len=seq_len, fusion=fusion, attention=attention,
              model_dtype=model_dtype)
    chip = system.chip.name
    fits, considered = [], 0
    for p in plans(system, workload, global_batch, seq_len):
        considered += 1
        fp = fitting(workload, p, global_batch, chip, **kw)  # memory first
        if fp is not None:
            fits.append((p, fp))
    results = sorted((cost(system, workload, p, global_batch, fp, **kw, message_bytes=message_bytes,
                           dispatch=dispatch, routing=routing) for p, fp in fits), key=lambda r: r.step_s)
    return Search(results[:top], considered, considered - len(fits), global_batch, time.perf_counter() - start)


def cost(system: System, workload: str, plan: Parallel, global_batch: int, memory: Footprint | None = None, *,
         dtype: str = "bf16", optimizer: str = "adamw", seq_len: int | None = None,
         message_bytes: int | None = None, fusion="eager", overlap=(), async_p2p=False, attention="sdpa",
         model_dtype: str = "emulated", dispatch: str = "all_to_all", routing: str = "uniform",
         schedules: int = 1) -> PlanResult:
    """The plan's emulated step on `system` (see the module docstring); message_bytes as `search`; fusion ("eager"
    or "fused": kernels/fusion.py), attention (kernels/attention.py) and Megatron's overlaps: analytic/megatron.py.
    async_p2p: the pipeline's p2p messages overlap the compute (the Llama 3 paper's PP, section
    3.3.2), so only the bubble's chain pays them; torch's schedules, which the runs use, expose them.
    dispatch: "all_to_all" (a copy per token and expert, as the runs send it) or "deepep" (a copy per
    domain reached under `routing`: analytic/deepep.py). schedules: pipeline schedules a step runs
    on its microbatches (a loop calling torch's schedule.step per local batch), each with its bubble
    and, as torch's stages do at their last backward, its data-parallel gradient sync."""
    overlap = megatron.check(overlap, fusion)
    accumulate.check_schedules(plan, schedules)
    deepep.check(dispatch, routing)
    c = config_of(workload, seq_len)
    m = plan.n_microbatches
    mb = global_batch // plan.dp // m
    meas = measure(workload, plan.tp, plan.ep, mb, system.chip.name, dtype=dtype, optimizer=optimizer,
                   seq_len=seq_len, fusion=fusion, attention=attention, sp=plan.sp, model_dtype=model_dtype)
    size = message_bytes or ITEMSIZE[dtype]  # bytes per element of a message
    act = mb * c.seq_len * c.dim * size  # one microbatch's activation, bytes
    kernels = _Kernels(CostModel(system.chip, dtype), ITEMSIZE[dtype])
    coll = lambda dim, primitive, n: _collective(system, plan, dim, primitive, n)  # noqa: E731
    tp_fwd, tp_bwd = megatron.tensor_parallel(*tensor_parallel.all_reduces(plan, c, mb, size, kernels, coll),
                                              meas.parts, plan, overlap)
    routed = c.top_k * act if hasattr(c, "n_experts") else 0
    if dispatch == "deepep" and routed and plan.ep > 1:
        a2a = deepep.seconds(act, c.top_k, c.n_experts, *_group(system, plan.dp, plan.tp, plan.pp, plan.ep, "ep"),
                             routing)
    else:
        a2a = _collective(system, plan, "ep", "all_to_all", routed) if plan.ep > 1 else 0.0
    # and before the dispatch, the token counts per expert (int64), once per forward pass
    counts = _collective(system, plan, "ep", "all_to_all", 8 * c.n_experts) if plan.ep > 1 else 0.0
    p2p = 2 * system.link(0, system.devices // plan.pp).seconds(act) if plan.pp > 1 else 0.0
    dense = getattr(c, "n_dense_layers", c.n_layers)
    base, stages = meas.parts["base"], []
    for s in range(plan.pp):
        layers = stage_layers(c.n_layers, plan.pp, s)
        kinds = ["dense" if i < dense else "moe" for i in layers]
        again = [activations.rerun(plan, i, meas.parts[k]) for i, k in enumerate(kinds)]  # (recompute s, 0 or 1)
        # the embedding's lookup is cheap: the base's figures (head, norm, loss) go to the last stage
        compute = sum(meas.parts[k].forward_s + meas.parts[k].backward_s + x for k, (x, _) in zip(kinds, again))
        compute += (base.forward_s + base.backward_s) if s == plan.pp - 1 else 0.0
        compute += sum((1 + r) * tp_fwd[k][1] + tp_bwd[k][1] for k, (_, r) in zip(kinds, again))
        tp = sum((1 + r) * tp_fwd[k][0] + tp_bwd[k][0] for k, (_, r) in zip(kinds, again))
        for k in [k for k, here in (("embedding", s == 0), ("head", s == plan.pp - 1)) if here]:  # the vocabulary's
            compute, tp = compute + tp_fwd[k][1] + tp_bwd[k][1], tp + tp_fwd[k][0] + tp_bwd[k][0]
        ep = sum((2 + r) * 2 * a2a + (1 + r) * counts for k, (_, r) in zip(kinds, again) if k == "moe")
        stages.append((compute, tp, ep, p2p, kinds, s))
    slowest = max(stages, key=lambda x: sum(x[:4]))
    compute, tp, ep, p2p, kinds, s = slowest
    p2p = megatron.p2p(p2p, compute, plan, overlap)
    cached = (m - 1) * sum(meas.parts[k].weight_cast_s for k in kinds)  # FP8 weights cast once a step (fusion.py)
    t_max = compute + tp + ep + p2p
    params = [meas.parts[k] for k in kinds]
    # the embedding's half of the base on stage 0, the head's on the last (as footprint.py)
    halves = (s == 0) + (s == plan.pp - 1)
    held = params + [replace(base, params=base.params * halves // 2)]
    per_kind = _tensors(workload, plan.tp, plan.ep, seq_len)
    tensors = [per_kind[k] for k in kinds] + [tuple(x * halves // 2 for x in per_kind["base"])]
    if plan.ep == 1:  # without expert parallelism plans.py syncs and shards experts as any parameter
        held, tensors = [replace(p, expert_params=0) for p in held], [(n, 0) for n, _ in tensors]
    opt = _optimizer(plan, held, tensors, kernels, OPTIMIZER_OPS.get(optimizer, 1))
    copies, dp = _data_parallel(system, plan, held, tensors, size, kernels, m, overlap, schedules)
    dp = megatron.data_parallel(dp, plan, overlap)
    v = plan.n_stages  # interleaved 1F1B: a v-th of the bubble, v times the p2p messages
    exposed_p2p = 0.0 if async_p2p else m * v * p2p
    bd = Breakdown(m * compute - cached + opt + copies, m * tp, schedules * (plan.pp - 1) * t_max / v + exposed_p2p,
                   m * ep, schedules * dp)
    memory = memory or footprint(workload, plan, global_batch, system.chip.name, dtype=dtype, optimizer=optimizer,
                                 seq_len=seq_len, measured=meas, fusion=fusion, attention=attention)
    tokens = global_batch * c.seq_len
    flops = analytic.model_flops(c, tokens)
    step = bd.total
    return PlanResult(plan, bd, memory, step, tokens / step, flops / (step * system.peak("bf16")), mb)


@dataclass(frozen=True)
class _Kernels:
    """What the cost model charges the kernels that move parameters or gradients around."""

    model: CostModel
    itemsize: int  # bytes per element of a floating tensor, as the cost model charges it

    def seconds(self, kernels: float, elements: float) -> float:
        """`kernels` launches that read and write `elements` elements in all (memory-bound)."""
        return (kernels - 1) * self.model.seconds(0, 0) + self.model.seconds(0, elements * self.itemsize)


def _optimizer(plan: Parallel, parts, tensors, kernels: _Kernels, ops: int) -> float:
    """Each part's measured optimizer step: its launches (ops per tensor; FSDP2 keeps every tensor,
    sharded) whole, the rest divided by dp under FSDP (experts: by the dp / ep replicas holding them)."""
    out = 0.0
    for p, (n, _) in zip(parts, tensors):
        launches = min(n * ops * kernels.model.seconds(0, 0), p.optimizer_s)
        dense, experts = (p.params - p.expert_params) / plan.dp, p.expert_params / plan.dp_outer
        out += launches + (p.optimizer_s - launches) * ((dense + experts) / max(p.params, 1)
                                                         if plan.fsdp or plan.dist_opt else 1)
    return out


def _data_parallel(system, plan: Parallel, parts, tensors, size: int, kernels: _Kernels, m: int, overlap=(),
                   schedules: int = 1) -> tuple:
    """(Compute, exposed communication) of data parallelism, emulated seconds, as plans.py runs it.

    Buckets (no fsdp, any tp): gradients in BUCKET_MB buckets, each all-reduced when its last gradient
    is made in the last microbatch's backward (pp = 1: the last bucket and whatever outlasts the
    backward exposed) or all after the schedule (pp > 1, exposed); a cat per bucket and a copy back
    per tensor. FSDP2 (units: each block, the root, and with ep > 1 each MoE block's experts over the
    dp / ep replicas holding them): its kernels (`_fsdp`), its gathers and reduce-scatters
    prefetched as the device timeline runs them (overlap.py; under a pipeline the reduce-scatters,
    sent after the schedule, exposed). Expert gradients without fsdp: an all-reduce per tensor over
    dp / ep, exposed; under Megatron's "dp" overlap in its own buckets, as the dense (megatron.py)."""
    expert_tensors, expert_params = sum(e for _, e in tensors), sum(p.expert_params for p in parts)
    compute, exposed = accumulate.adds(plan, parts, tensors, kernels), 0.0  # (accumulated microbatches)
    syncs = schedules if plan.pp > 1 else 1  # gradient syncs a step (each pipeline schedule's, under one)
    if expert_tensors and not plan.shards_experts:
        compute += syncs * kernels.seconds(expert_tensors, 2 * expert_params)  # sync_experts' div_
        if plan.dp_outer > 1:  # per tensor (Megatron's "dp" overlap: in its buckets, megatron.messages)
            n = megatron.messages(expert_tensors, expert_params * size, plan.dp, size, overlap)
            exposed = n * _collective(system, plan, "dp_outer", "all_reduce", expert_params * size / n)
    if plan.dp == 1:
        return compute, exposed
    dense = [(p.params - p.expert_params, n - e, p.backward_s) for p, (n, e) in zip(parts, tensors)]
    params, owned = sum(d[0] for d in dense), sum(d[1] for d in dense)
    if plan.fsdp:
        # units: each block and the root (the stage's embedding, norm and head); each MoE block's experts
        experts = [p.expert_params for p in parts if p.expert_params] if plan.shards_experts else []
        compute += _fsdp(plan, [d[0] for d in dense if d[0]], len(dense) - 1, kernels, m, schedules) + \
            _fsdp(plan, experts, len(experts), kernels, m, schedules)
        coll = lambda dim, primitive, n: _collective(system, plan, dim, primitive, n * size)  # noqa: E731
        return compute, exposed + fsdp_exposed(plan, parts, [d[0] for d in dense], coll, m)  # (overlap.py)
    grads = params * size
    buckets = max(math.ceil(grads / megatron.bucket_bytes(BUCKET_MB * 1e6, plan.dp, size, overlap)), 1)
    each = _collective(system, plan, "dp", "all_reduce", grads / buckets)
    compute += syncs * kernels.seconds(buckets + owned, 4 * params)
    if plan.pp > 1:
        return compute, exposed + buckets * each
    return compute, megatron.buckets(exposed, buckets * each, sum(d[2] for d in dense), each, overlap)


def _fsdp(plan: Parallel, units: list, blocks: int, kernels: _Kernels, m: int, schedules: int = 1) -> float:
    """Emulated seconds of the kernels FSDP2 units of `units` parameters charge around their
    collectives (copy-in, copy-out, chunk_cat): each microbatch gathers every unit forward, the
    first `blocks` again backward, and reduce-scatters each (a pipeline keeps them gathered after
    the first backward and reduce-scatters once a schedule). The collectives themselves: overlap.py."""
    if not units:
        return 0.0
    again, syncs = (m, m) if plan.pp == 1 else (schedules, schedules)  # backward's gathers; reduce-scatters
    n_gather, n_scatter = m * len(units) + again * blocks, syncs * len(units)
    launches = FSDP_GATHER_KERNELS * n_gather + FSDP_SCATTER_KERNELS * n_scatter
    return kernels.seconds(launches, 2 * sum(units) * (n_gather + n_scatter) / len(units))


def _collective(system: System, plan: Parallel, dim: str, primitive: str, nbytes: float) -> float:
    """Closed-form seconds of one collective of device 0's `dim` group, on that group's System."""
    if nbytes <= 0:
        return 0.0
    sub, fabric = _group(system, plan.dp, plan.tp, plan.pp, plan.ep, dim)
    if sub.devices == 1:
        return 0.0
    return predict(primitive, "auto", nbytes, sub, fabric=fabric)


@functools.lru_cache(maxsize=256)
def _tensors(workload: str, tp: int, ep: int, seq_len: int | None) -> dict:
    """Per kind (base, dense, moe), the parameter tensors one device holds and of them the experts'
    (counted on the meta device): the optimizer's and data parallelism's kernels launch per tensor."""
    c = config_of(workload, seq_len)

    def count(n_layers: int, dense: int) -> tuple:
        with torch.device("meta"):
            model = footprints._workload(workload, footprints.shard(c, tp, ep), tp, n_layers, dense).build_model()
        return len(names := [n for n, _ in model.named_parameters()]), sum(".experts." in n for n in names)

    base = count(0, 0)
    out = {"base": base, "dense": tuple(x - y for x, y in zip(count(1, 1), base))}
    if hasattr(c, "n_experts"):
        out["moe"] = tuple(x - y for x, y in zip(count(1, 0), base))
    return out


@functools.lru_cache(maxsize=4096)
def _group(system: System, dp: int, tp: int, pp: int, ep: int, dim: str):
    members = Parallel(dp=dp, tp=tp, pp=pp, ep=ep).group(dim, 0)
    g = group_of(system, Fabric.of(system), members, members[0])
    return g.system, g.fabric
