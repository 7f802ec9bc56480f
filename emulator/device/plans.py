"""A parallelism plan (emulator/parallel.py) applied to a model with PyTorch's own APIs, on one
device, on the plan's one DeviceMesh (pp, dp / ep, ep, tp) over the `relay` backend:

* expert parallel (ep): each device keeps n_experts / ep of every MoE layer's experts, and the
  layer's (token, choice) pairs, already grouped per expert, go to the experts' devices and back
  through `all_to_all_single_autograd` (as torchtitan's expert parallelism does);
* pipeline (pp): a stage holds a contiguous run of blocks (the embedding on the first, the norm
  and the head on the last) and runs under `torch.distributed.pipelining`'s Schedule1F1B;
* tensor parallel (tp): `parallelize_module` on every block, column-wise into attention (the
  heads split) and the SwiGLU, row-wise out of them (Megatron's pairing); embeddings, norms,
  the output head, routers and experts stay replicated inside the tensor-parallel group;
* recompute: each block's forward under `torch.utils.checkpoint` (non-reentrant);
* data parallel (dp): FSDP2 (`fully_shard` on each block, then the root) with `fsdp`; otherwise
  DDP, except with tp > 1, where torch's DDP does not take DTensor parameters and each local
  gradient is averaged over the replicas with all_reduce after backward instead. Expert
  parameters are left out of both and summed over the replicas that hold the same experts.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import PipelineStage, Schedule1F1B
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from emulator.workloads.llama import SwiGLU
from emulator.workloads.moe import MLA, MoE


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
    """The language workloads' loss (workloads/tokens.py) as a pipeline schedule calls it."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ---------------------------------------------------------------- expert parallel
def expert_parallel(model: nn.Module, group, ep: int, index: int) -> list[nn.Parameter]:
    """Keep experts [index * E / ep, (index + 1) * E / ep) of every MoE layer on this device and
    route tokens to their experts' devices; returns the experts' parameters kept."""
    kept = []
    for block in model.blocks:
        moe = block.ffn
        if not isinstance(moe, MoE):
            continue
        local = moe.c.n_experts // ep
        moe.experts = nn.ModuleList(list(moe.experts)[index * local:(index + 1) * local])
        moe.expert_offset = index * local
        moe.dispatch = _ExpertDispatch(moe, group, ep, local)
        kept += list(moe.experts.parameters())
    return kept


class _ExpertDispatch:
    """MoE.dispatch across an expert-parallel group: the same sums, in the same order, as the
    one-device dispatch (workloads/moe.py), with the pairs of each expert computed on its device."""

    def __init__(self, moe: MoE, group, ep: int, local: int):
        self.moe, self.group, self.ep, self.local = moe, group, ep, local

    def __call__(self, x, idx, weights):
        moe, ep, local, k = self.moe, self.ep, self.local, self.moe.c.top_k
        choice = idx.reshape(-1)  # (N k,) the expert of each (token, choice)
        order = choice.argsort(stable=True)  # grouped by expert, hence by the expert's device
        counts = torch.bincount(choice, minlength=moe.c.n_experts)  # (E,)
        moe.counts = counts.tolist()
        token = order // k
        grouped = x[token]  # (N k, d)
        got = torch.empty_like(counts)  # from each peer: its pairs for each of my experts
        dist.all_to_all_single(got, counts, group=self.group)
        got = got.view(ep, local)
        send = counts.view(ep, local).sum(1).tolist()
        recv = got.sum(1).tolist()
        arrived = all_to_all_single_autograd(grouped, recv, send, self.group)  # by peer, then expert
        pieces = arrived.split(got.reshape(-1).tolist())  # piece p * local + e
        outs = [moe.experts[e](torch.cat([pieces[p * local + e] for p in range(ep)])) for e in range(local)]
        parts = [o.split(got[:, e].tolist()) for e, o in enumerate(outs)]  # parts[e][p]
        back = torch.cat([parts[e][p] for p in range(ep) for e in range(local)])  # by peer, then expert
        out = all_to_all_single_autograd(back, send, recv, self.group)  # (N k, d) in `order`
        out = out * weights.reshape(-1)[order].unsqueeze(1)
        return torch.zeros_like(x).index_add_(0, token, out)


def sync_experts(params: list, group, replicas: int) -> None:
    """Expert gradients: each device's experts saw the tokens of its whole expert-parallel group,
    so the global batch's gradient is their sum over the replicas holding the same experts,
    divided by all replicas (each replica's loss is a mean over its own share)."""
    for p in params:
        if p.grad is None:  # an expert no token chose
            p.grad = torch.zeros_like(p)
        if dist.get_world_size(group) > 1:
            dist.all_reduce(p.grad, group=group)
        p.grad.div_(replicas)


# ---------------------------------------------------------------- tensor parallel, recompute
def tensor_parallel(blocks, mesh, tp: int) -> None:
    """Megatron's pairing on each block: column-wise in, row-wise out, so each block's attention
    and feed-forward cost one all-reduce each way; the heads split tp ways."""
    for block in blocks:
        attn, plan = block.attn, {}
        if isinstance(attn, MLA):
            attn.c = replace(attn.c, n_heads=attn.c.n_heads // tp)  # the low-rank latents stay whole
            plan |= {"attn.wq_b": ColwiseParallel(), "attn.wkv_b": ColwiseParallel()}
            attn.wkv_a.register_forward_hook(_SharedKey(mesh, attn.c))
        else:
            attn.n_heads, attn.n_kv_heads = attn.n_heads // tp, attn.n_kv_heads // tp
            plan |= {f"attn.{w}": ColwiseParallel() for w in ("wq", "wk", "wv")}
        plan["attn.wo"] = RowwiseParallel()
        if isinstance(block.ffn, SwiGLU):
            plan |= {"ffn.w1": ColwiseParallel(), "ffn.w3": ColwiseParallel(), "ffn.w2": RowwiseParallel()}
        parallelize_module(block, mesh, plan)


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


def recompute(blocks) -> None:
    """Activation checkpointing: each block keeps only its input and reruns its forward in backward."""
    for block in blocks:
        block.forward = _Recompute(block.forward)


class _Recompute:
    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args):
        return checkpoint(self.forward, *args, use_reentrant=False)


# ---------------------------------------------------------------- data parallel
def data_parallel(module: nn.Module, blocks, plan, mesh, ignored: list, bucket_mb: float):
    """FSDP2 or DDP over the replicas (see the module's docstring); returns the module to call
    and whether gradients still need averaging by hand (tp > 1 without fsdp)."""
    if plan.dp == 1:
        return module, False
    skip = set(ignored) or None
    if plan.fsdp:
        for block in blocks:
            fully_shard(block, mesh=mesh, ignored_params=skip)
        fully_shard(module, mesh=mesh, ignored_params=skip)
        return module, False
    if plan.tp > 1:
        return module, True
    if skip:
        DDP._set_params_and_buffers_to_ignore_for_model(module, [n for n, p in module.named_parameters() if p in skip])
    # Under a pipeline schedule DDP's first step has a backward per microbatch, and the bucket
    # order it then rebuilds lists each parameter once per microbatch (an internal assert of
    # torch's reducer fails in the second step: "rebuilt parameter indices size is not same as
    # original model parameters size"); find_unused_parameters turns that rebuild off.
    return DDP(module, process_group=mesh.get_group(), bucket_cap_mb=bucket_mb,
               find_unused_parameters=plan.pp > 1), False


def average_gradients(params, group) -> None:
    """The replicas' mean of each local gradient (tensor parallel without fsdp)."""
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            dist.all_reduce(g, op=dist.ReduceOp.AVG, group=group)


def pipeline(stage: nn.Module, index: int, plan, group) -> Schedule1F1B:
    return Schedule1F1B(PipelineStage(stage, index, plan.pp, torch.device("cpu"), group=group),
                        plan.n_microbatches, loss_fn=lm_loss)


def full_state(module: nn.Module, expert_offset: int) -> dict:
    """Every tensor of the module's state in full (DTensors gathered: every member of their mesh
    calls this), named as in the unsplit model (experts by their model-wide index)."""
    out = {}
    for k, v in module.state_dict().items():
        v = v.full_tensor() if isinstance(v, DTensor) else v
        k = re.sub(r"(\.experts\.)(\d+)\.", lambda m: f"{m[1]}{int(m[2]) + expert_offset}.", k)
        out[k] = v.detach().clone()
    return out
