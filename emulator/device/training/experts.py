"""Expert parallelism (plans.py's `ep`): each device keeps n_experts / ep of every MoE layer's
experts, and the layer's (token, choice) pairs, already grouped per expert, go to the experts'
devices and back through `all_to_all_single_autograd` (as torchtitan's expert parallelism does).
Data parallelism over the replicas holding the same experts: plans.data_parallel (fsdp) or
`sync_experts`.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from relay.kernels import moe_ops
from relay.workloads.moe import Experts, MoE


def expert_parallel(model: nn.Module, group, ep: int, index: int) -> list[nn.Parameter]:
    """Keep experts [index * E / ep, (index + 1) * E / ep) of every MoE layer on this device and
    route tokens to their experts' devices; returns the experts' parameters kept."""
    kept = []
    for block in model.blocks:
        moe = block.ffn
        if not isinstance(moe, MoE):
            continue
        local = moe.c.n_experts // ep
        moe.experts = Experts(list(moe.experts)[index * local:(index + 1) * local])
        moe.expert_offset = index * local
        moe.dispatch = _ExpertDispatch(moe, group, ep, local)
        kept += list(moe.experts.parameters())
    return kept


class _ExpertDispatch:
    """MoE.dispatch across an expert-parallel group: the same sums, in the same order, as the
    one-device dispatch (workloads/moe.py), with the pairs of each expert computed on its device.
    On fake tensors the layer's routing model gives the counts, and every peer, routing as many
    tokens by the same model, sends this device as many pairs per expert as it sends its own."""

    def __init__(self, moe: MoE, group, ep: int, local: int):
        self.moe, self.group, self.ep, self.local = moe, group, ep, local

    def __call__(self, x, idx, weights):
        moe, ep, local, k = self.moe, self.ep, self.local, self.moe.c.top_k
        choice = idx.reshape(-1)  # (N k,) the expert of each (token, choice)
        order = choice.argsort(stable=True)  # grouped by expert, hence by the expert's device
        counts = torch.zeros(moe.c.n_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, choice, torch.ones_like(choice))  # (E,) choices per expert
        token = order // k
        grouped = moe_ops.permute(x, token)  # (N k, d) = x[token]
        got = torch.empty_like(counts)  # from each peer: its pairs for each of my experts
        dist.all_to_all_single(got, counts, group=self.group)
        if moe.routing is None:  # the data decides
            moe.counts = counts.tolist()
            got = got.view(ep, local).tolist()
        else:
            moe.counts = moe.routing.counts(moe.layer, choice.numel(), moe.c.n_experts, k)
            mine = moe.counts[moe.expert_offset:moe.expert_offset + local]
            got = [mine] * ep
        send = [sum(moe.counts[p * local:(p + 1) * local]) for p in range(ep)]
        recv = [sum(row) for row in got]
        arrived = all_to_all_single_autograd(grouped, recv, send, self.group)  # by peer, then expert
        # regrouped by expert (then peer) with one gather, and back with another, as torchtitan's
        # permutation does: the rows each expert takes are those the one-device dispatch gives it
        starts = list(itertools.accumulate((n for row in got for n in row), initial=0))  # piece p * local + e
        by_expert = [i for e in range(local) for p in range(ep)
                     for i in range(starts[p * local + e], starts[p * local + e + 1])]
        back = [0] * len(by_expert)
        for i, j in enumerate(by_expert):
            back[j] = i
        ins = moe_ops.permute(arrived, torch.tensor(by_expert, device=x.device))
        outs = moe.experts(ins, [sum(got[p][e] for p in range(ep)) for e in range(local)])  # by expert, then peer
        out = all_to_all_single_autograd(moe_ops.permute(outs, torch.tensor(back, device=x.device)), send, recv,
                                         self.group)
        return moe_ops.unpermute(out, weights.reshape(-1)[order], token, x.shape[0])


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
