"""A parallelism plan (emulator/parallel.py) applied to a model with PyTorch's own APIs, on one
device, on the plan's one DeviceMesh (pp, dp / ep, ep, tp) over the `relay` backend:

* expert parallel (ep): experts.py;
* pipeline (pp): a stage holds a contiguous run of blocks (the embedding on the first, the norm
  and the head on the last) and runs under `torch.distributed.pipelining`'s Schedule1F1B; with
  `stages` > 1 the model is cut into pp x stages chunks and rank r holds chunks r, r + pp, ...
  (virtual stages, as Megatron's), run by ScheduleInterleaved1F1B;
* tensor parallel (tp): `parallelize_module` on every block, column-wise into attention (the
  heads split) and the SwiGLU, row-wise out of them (Megatron's pairing); the vocabulary split
  too (`vocab_parallel`: the embedding row-wise, the head column-wise, the loss under
  `loss_parallel`, as torchtitan and Megatron-LM run them); norms, routers and experts stay
  replicated inside the tensor-parallel group; with
  `sp` (sequence parallel, as torchtitan's parallelize_llama) the blocks' norms and residual
  stream are split along the sequence (SequenceParallel), gathered into attention and the
  feed-forward (PrepareModuleInput) and reduce-scattered out of them (RowwiseParallel to
  Shard(1)); each run of blocks takes the whole sequence in and gives it back whole;
* activation checkpointing (`ac`: full, torchtitan's selective op and layer modes): each chosen
  block's forward under `torch.utils.checkpoint` (non-reentrant), workloads/checkpoint.py;
* data parallel (dp): FSDP2 (`fully_shard` on each block, then the root) with `fsdp`; otherwise
  DDP's algorithm (`Buckets`: bucketed asynchronous all_reduce during backward), since torch's
  DDP takes neither DTensor parameters nor fake tensors. Under expert parallelism a layer's
  experts are held by the dp / ep replicas of one expert index: with `fsdp` they are sharded over
  those replicas (`fully_shard` on the layer's Experts with the dp_outer mesh, as torchtitan shards
  experts over dp_shard / ep, their reduce-scatter divided by dp), otherwise left out of both and
  summed over those replicas (`sync_experts`).

Every part runs on fake tensors too (tensors="fake"): the pipeline's shapes are given, not
inferred at run time, and expert parallelism routes by the layers' routing models.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.nn import functional as F

from relay.workloads.llama import SwiGLU
from relay.workloads.moe import MLA, Experts


class Stage(nn.Module):
    """Blocks [lo, hi) of a Transformer (workloads/llama.py), the embedding on the first stage and
    the final norm and output head on the last. Blocks keep their model-wide names (blocks.5...)."""

    def __init__(self, model: nn.Module, lo: int, hi: int):
        super().__init__()
        n = len(model.blocks)
        self.tok = model.tok if lo == 0 else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(lo, hi)})
        self.norm, self.head = (model.norm, model.head) if hi == n else (None, None)
        self.register_buffer("cos", model.cos, persistent=False)
        self.register_buffer("sin", model.sin, persistent=False)

    def forward(self, x):  # (B, T) token ids on the first stage, else (B, T, d) -> the next stage's input
        T = x.shape[1]
        if self.tok is not None:
            x = self.tok(x)
        for block in self.blocks.values():
            x = block(x, self.cos[:T], self.sin[:T])
        return self.head(self.norm(x)) if self.head is not None else x


def stage_of(model: nn.Module, stage: int, stages: int) -> Stage:
    """Stage `stage` of `stages`: blocks split as evenly as they go, the first stages one longer."""
    n = len(model.blocks)
    bounds = [i * (n // stages) + min(i, n % stages) for i in range(stages + 1)]
    return Stage(model, bounds[stage], bounds[stage + 1])


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The language workloads' loss (workloads/tokens.py) as a pipeline schedule calls it (on
    vocabulary-sharded logits under tensor parallel: inside `loss_parallel`, see vocab_parallel)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ---------------------------------------------------------------- tensor parallel
def vocab_parallel(part: nn.Module, mesh) -> None:
    """The vocabulary split over the tensor-parallel group, as torchtitan's parallelize_llama and
    Megatron-LM split it: the embedding row-wise (vocab / tp rows each; each device looks up the
    tokens it holds, an all-reduce makes the whole output, Replicate) and the head column-wise
    (vocab / tp logits each, left a DTensor sharded on the vocabulary, which the loss reads under
    torch's `loss_parallel()`: a few all-reduces of one number per token, forward). The head takes
    the blocks' whole (Replicate) output and the final norm stays whole, so the blocks' layouts,
    sequence parallel's included, are unchanged; torchtitan under sp instead reduce-scatters the
    embedding's output and gathers the norm's (the same bytes, split differently). `part`: the
    model or a pipeline stage (its embedding on the first, its head on the last)."""
    plan = {}
    if getattr(part, "tok", None) is not None:
        plan["tok"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if getattr(part, "head", None) is not None:
        plan["head"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False)
    if plan:
        parallelize_module(part, mesh, plan, src_data_rank=None)  # each keeps its shard of the seed's weights
    if "tok" in plan:  # (before data parallel's hooks, which read the gradient)
        part.tok.weight.register_post_accumulate_grad_hook(_own_rows)


@torch.no_grad()
def _own_rows(weight) -> None:
    """DTensor has no row-wise rule for the embedding's backward: each device makes the whole
    weight's gradient (Replicate), as under torchtitan; it keeps its own rows (a slice, no message),
    laid out as the weight, for data parallel and the optimizer."""
    g = weight.grad
    if isinstance(g, DTensor) and g.placements != weight.placements:
        weight.grad = g.redistribute(g.device_mesh, weight.placements)


def tensor_parallel(blocks, mesh, tp: int, sp: bool = False) -> None:
    """Megatron's pairing on each block: column-wise in, row-wise out, so each block's attention
    and feed-forward cost one all-reduce each way (with `sp`: an all-gather in and a
    reduce-scatter out, the norms on 1 / tp of the sequence); the heads split tp ways."""
    out = Shard(1) if sp else Replicate()  # the row-wise layers' output: the residual stream's layout
    for block in blocks:
        attn, plan = block.attn, {}
        if isinstance(attn, MLA):
            attn.c = replace(attn.c, n_heads=attn.c.n_heads // tp)  # the low-rank latents stay whole
            plan |= {"attn.wq_b": ColwiseParallel(), "attn.wkv_b": ColwiseParallel()}
            attn.wkv_a.register_forward_hook(_SharedKey(mesh, attn.c))
        else:
            attn.n_heads, attn.n_kv_heads = attn.n_heads // tp, attn.n_kv_heads // tp
            plan |= {f"attn.{w}": ColwiseParallel() for w in ("wq", "wk", "wv")}
        plan["attn.wo"] = RowwiseParallel(output_layouts=out)
        dense = isinstance(block.ffn, SwiGLU)
        if dense:
            plan |= {"ffn.w1": ColwiseParallel(), "ffn.w3": ColwiseParallel(),
                     "ffn.w2": RowwiseParallel(output_layouts=out)}
        if sp:
            plan |= _sequence_parallel(local_attn=isinstance(attn, MLA), dense=dense)
        # every device built the same weights from one seed: each keeps its own shard, no scatter
        parallelize_module(block, mesh, plan, src_data_rank=None)
    if sp and blocks:  # the run of blocks takes the whole sequence in, its share kept, and gives it back whole
        parallelize_module(blocks[0], mesh, PrepareModuleInput(
            input_layouts=(Replicate(), None, None), desired_input_layouts=(Shard(1), None, None),
            use_local_output=True))
        parallelize_module(blocks[-1], mesh, PrepareModuleOutput(
            output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True))


def _sequence_parallel(local_attn: bool, dense: bool) -> dict:
    """torchtitan's sequence-parallel plan of a block: norms on the sequence's shard, their output
    gathered whole into attention and the feed-forward. Layers that are not split (MLA's latents,
    a MoE's router and experts) take plain tensors, and a MoE, replicated, gives back its own
    share of the sequence."""
    def gather(local: bool, n: int) -> PrepareModuleInput:
        return PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * (n - 1),
                                  desired_input_layouts=(Replicate(),) + (None,) * (n - 1), use_local_output=local)

    ffn = gather(False, 1) if dense else PrepareModuleInputOutput(
        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
        output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True)
    return {"attn_norm": SequenceParallel(), "ffn_norm": SequenceParallel(), "attn": gather(local_attn, 3),
            "ffn": ffn}


class _SharedKey:
    """MLA's rotary key is one for all heads and reaches attention without a column-wise layer,
    so each device's gradient for it holds only its own heads' share: Megatron's "copy to the
    tensor-parallel region" (identity forward, all-reduce in backward), made of DTensor's
    from_local and to_local(grad_placements=Partial)."""

    def __init__(self, mesh, c):
        self.mesh, self.split = mesh, [c.kv_lora_rank, c.qk_rope_dim]

    def __call__(self, module, args, out):
        kv, k_pe = out.split(self.split, dim=-1)
        k_pe = DTensor.from_local(k_pe, self.mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])
        return torch.cat([kv, k_pe], dim=-1)


# ---------------------------------------------------------------- data parallel
def data_parallel(modules: list, blocks: list, plan, mesh, ignored: list, bucket_mb: float, expert_mesh=None):
    """FSDP2 over the replicas with `fsdp` (each block, then each of this device's modules: its
    pipeline chunks, or the model; first each layer's experts over `expert_mesh`, if given);
    otherwise the replicas' mean gradient by Buckets (see the module's docstring). Returns the
    Buckets (None: nothing left to do after backward)."""
    if plan.dp == 1:
        return None
    skip = set(ignored)
    if plan.fsdp:
        for experts in (m for block in blocks for m in block.modules() if isinstance(m, Experts)) \
                if expert_mesh is not None else ():
            fully_shard(experts, mesh=expert_mesh)
            # summed over the replicas holding them, divided by all replicas (see sync_experts)
            experts.set_gradient_divide_factor(plan.dp)
            experts.set_force_sum_reduction_for_comms(True)
        for block in blocks:
            fully_shard(block, mesh=mesh, ignored_params=skip or None)
        for module in modules:
            fully_shard(module, mesh=mesh, ignored_params=skip or None)
        return None
    params = [p for module in modules for p in module.parameters() if p.requires_grad and p not in skip]
    return Buckets(params, mesh.get_group(), bucket_mb, overlap=plan.pp == 1)


class Buckets:
    """DDP's algorithm on the replicas, through torch.distributed on `relay`: gradients (local
    shards of DTensors) in buckets of about `bucket_mb` MB, parameters in reverse order (as
    backward makes them), each bucket averaged by an asynchronous all_reduce as soon as its last
    gradient is made (`overlap`; a pipeline, whose backward runs once per microbatch, sends them
    all after the schedule's step instead). torch's DDP cannot take DTensor parameters nor fake
    tensors (its C++ reducer reads gradient storage), hence this."""

    def __init__(self, params: list, group, bucket_mb: float, overlap: bool = True):
        self.group, self.buckets, size = group, [[]], 0
        for p in reversed(params):
            n = local(p).numel() * local(p).element_size()
            if self.buckets[-1] and size + n > bucket_mb * 1e6:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += n
        self.where = {p: i for i, b in enumerate(self.buckets) for p in b}
        self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in params] if overlap else []
        self.reset()

    def reset(self) -> None:
        self.waiting = [len(b) for b in self.buckets]
        self.sent: list = []  # (work, flat) per bucket launched, in bucket order
        self.sync = True  # False: gradients accumulate, nothing sent (DDP's no_sync)

    def _ready(self, p) -> None:
        if not self.sync:
            return
        self.waiting[self.where[p]] -= 1
        while len(self.sent) < len(self.buckets) and self.waiting[len(self.sent)] == 0:
            self._launch(len(self.sent))

    def _launch(self, i: int) -> None:
        flat = torch.cat([local(p.grad).reshape(-1) if p.grad is not None else local(p).new_zeros(local(p).numel())
                          for p in self.buckets[i]])
        self.sent.append((dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=self.group, async_op=True), flat))

    def finish(self) -> None:
        """After backward: send what is left, wait, and put the means back into the gradients."""
        while len(self.sent) < len(self.buckets):
            self._launch(len(self.sent))
        for (work, flat), bucket in zip(self.sent, self.buckets):
            work.wait()
            at = 0
            for p in bucket:
                g = local(p)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                local(p.grad).copy_(flat[at:at + g.numel()].view_as(g))
                at += g.numel()
        self.reset()


@torch.no_grad()
def sum_partial_grads(params) -> None:
    """Gradients left Partial by DTensor (sequence parallel's norms: each device's share of the
    sequence gave its part) summed over their group now, as DTensor would when the optimizer
    first reads them, but outside any op: a collective issued inside another op's dispatch
    passes the device's throttle by, and on fake tensors the fake mode alone would answer it."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(x.is_partial() for x in g.placements):
            p.grad = g.redistribute(g.device_mesh, p.placements)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def chunks_of(plan, rank: int) -> list[int]:
    """The model chunks (global stages) pipeline rank `rank` holds: rank, rank + pp, ... (one
    per virtual stage, the order ScheduleInterleaved1F1B expects)."""
    return [rank + v * plan.pp for v in range(plan.n_stages)]


def pipeline(stages: list, indices: list, plan, group, micro: tuple, dim: int, vocab: int, dtype):
    """Schedule1F1B over this device's stage (ScheduleInterleaved1F1B over its chunks: `stages`,
    the global stages `indices`), their inputs' and outputs' shapes given (torch then skips
    inferring them at run time, a metadata exchange that fake tensors could not carry): token ids
    (micro = (batch, T)) into the first stage, activations (micro + (dim,)) between stages,
    logits (micro + (vocab,)) out of the last."""
    n = plan.pp * plan.n_stages
    built = []
    for stage, index in zip(stages, indices):
        with torch.device("meta"):  # activations carry gradients back
            inp = torch.empty(micro, dtype=torch.long) if index == 0 else \
                torch.empty(micro + (dim,), dtype=dtype, requires_grad=True)
            out = torch.empty(micro + ((vocab if index == n - 1 else dim),), dtype=dtype, requires_grad=True)
        built.append(PipelineStage(stage, index, n, torch.device("cpu"), input_args=inp, output_args=out,
                                   group=group))
    if plan.interleaved:
        return ScheduleInterleaved1F1B(built, plan.n_microbatches, loss_fn=lm_loss)
    return Schedule1F1B(built[0], plan.n_microbatches, loss_fn=lm_loss)


def full_state(module: nn.Module, expert_offset: int) -> dict:
    """Every tensor of the module's state in full (DTensors gathered: every member of their mesh
    calls this), named as in the unsplit model (experts by their model-wide index)."""
    out = {}
    for k, v in module.state_dict().items():
        v = v.full_tensor() if isinstance(v, DTensor) else v
        k = re.sub(r"(\.experts\.)(\d+)\.", lambda m: f"{m[1]}{int(m[2]) + expert_offset}.", k)
        out[k] = v.detach().clone()
    return out
