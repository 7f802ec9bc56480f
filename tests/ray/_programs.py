"""Unmodified torch.distributed programs (DDP, FSDP2, 2-D tensor parallelism, a pipeline, an
expert-parallel MoE layer), and the one-process training each must equal. Each program trains
a small MLP for STEPS steps of plain SGD on its share of one global batch and returns the final
weights (full tensors) by name."""

import torch
import torch.distributed as dist
from torch import nn

STEPS, LR, BATCH = 3, 0.1, 16


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 8, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def sgd(params):
    with torch.no_grad():
        for p in params:
            p -= LR * p.grad
            p.grad = None


def shard(t, parts, i):
    return t.chunk(parts)[i]


def full(model):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def reference():
    """One process, the global batch."""
    model, (x, y) = mlp(), data()
    for _ in range(STEPS):
        nn.functional.mse_loss(model(x), y).backward()
        sgd(model.parameters())
    return full(model)


# ---------------------------------------------------------------- the programs
def ddp(bucket_cap_mb=25):
    from torch.nn.parallel import DistributedDataParallel as DDP
    r, w = dist.get_rank(), dist.get_world_size()
    model = DDP(mlp(), bucket_cap_mb=bucket_cap_mb)
    x, y = data()
    for _ in range(STEPS):
        nn.functional.mse_loss(model(shard(x, w, r)), shard(y, w, r)).backward()
        sgd(model.parameters())
    return full(model.module)


def fsdp2():
    from torch.distributed.fsdp import fully_shard
    r, w = dist.get_rank(), dist.get_world_size()
    model = mlp()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    x, y = data()
    for _ in range(STEPS):
        nn.functional.mse_loss(model(shard(x, w, r)), shard(y, w, r)).backward()
        sgd(model.parameters())
    return full(model)


def tensor_parallel_2d():
    """Column-wise then row-wise on the mesh's "tp" dimension (inside a scale-up domain),
    gradients averaged over "dp"."""
    import emulator.dist
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = emulator.dist.context().mesh(("dp", "tp"))
    model = parallelize_module(mlp(), mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    dp, i = mesh["dp"].size(), mesh["dp"].get_local_rank()
    x, y = data()
    for _ in range(STEPS):
        nn.functional.mse_loss(model(shard(x, dp, i)), shard(y, dp, i)).backward()
        for p in model.parameters():
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            dist.all_reduce(g, op=dist.ReduceOp.AVG, group=mesh.get_group("dp"))
        sgd(model.parameters())
    return {**full(model), "tp_group": dist.get_process_group_ranks(mesh.get_group("tp"))}


def pipeline(schedule="1F1B", microbatches=4):
    """Two stages (ranks 0 and 1), the whole batch in microbatches."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    r = dist.get_rank()
    model = mlp()
    part = model[:2] if r == 0 else model[2:]
    stage = PipelineStage(part, r, 2, torch.device("cpu"))
    kind = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe}[schedule]
    sched = kind(stage, microbatches, loss_fn=nn.functional.mse_loss)
    x, y = data()
    for _ in range(STEPS):
        if r == 0:
            sched.step(x)
        else:
            sched.step(target=y)
        sgd(part.parameters())
    return {k: v for k, v in full(model).items() if k.startswith("0." if r == 0 else "2.")}


# ---------------------------------------------------------------- expert parallelism
def moe_forward(experts, x, rank, world, a2a):
    """Top-1 routing by a fixed rule (token i of rank r goes to expert (i * i + r) % world: uneven
    counts), tokens exchanged with `a2a(out, inp, out_splits, in_splits)`, one expert per rank."""
    n = x.shape[0]
    dest = torch.tensor([(i * i + rank) % world for i in range(n)])
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    recv = a2a(x[order], send_counts.tolist(), recv_counts.tolist())
    out = experts(recv)
    back = a2a(out, recv_counts.tolist(), send_counts.tolist())
    return torch.empty_like(back).index_copy(0, order, back)


def moe():
    from torch.distributed._functional_collectives import all_to_all_single_autograd
    r, w = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    experts = [nn.Linear(8, 8) for _ in range(w)]
    mine = experts[r]
    x, _ = data()
    xs = shard(x, w, r)

    def a2a(inp, in_splits, out_splits):  # as torchtitan's expert parallelism calls it
        return all_to_all_single_autograd(inp, out_splits, in_splits, dist.group.WORLD)

    for _ in range(STEPS):
        loss = moe_forward(mine, xs, r, w, a2a).pow(2).mean()
        loss.backward()
        for p in mine.parameters():
            p.grad /= w  # each rank's loss is the mean over its tokens; the global one over all
        sgd(mine.parameters())
    return {f"expert{r}.{k}": v.detach().clone() for k, v in mine.state_dict().items()}


def moe_reference(world):
    torch.manual_seed(0)
    experts = [nn.Linear(8, 8) for _ in range(world)]
    x, _ = data()
    for _ in range(STEPS):
        total = 0
        for r, xs in enumerate(x.chunk(world)):
            dest = torch.tensor([(i * i + r) % world for i in range(xs.shape[0])])
            out = torch.stack([experts[int(d)](t) for t, d in zip(xs, dest)])
            total = total + out.pow(2).sum()
        (total / (x.shape[0] * 8)).backward()
        for e in experts:
            sgd(e.parameters())
    return {f"expert{r}.{k}": v.detach().clone() for r, e in enumerate(experts) for k, v in e.state_dict().items()}
