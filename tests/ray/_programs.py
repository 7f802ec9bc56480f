"""Unmodified torch.distributed programs (DDP, FSDP2, 2-D tensor parallelism, a pipeline, an
expert-parallel MoE layer), and the one-process training each must equal. Each program trains
a small MLP for STEPS steps of plain SGD on its share of one global batch and returns the final
weights (full tensors) by name."""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel as DDP

import relay.dist as ed

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
    r, w = dist.get_rank(), dist.get_world_size()
    model = DDP(mlp(), bucket_cap_mb=bucket_cap_mb)
    x, y = data()
    for _ in range(STEPS):
        nn.functional.mse_loss(model(shard(x, w, r)), shard(y, w, r)).backward()
        sgd(model.parameters())
    return full(model.module)


def fsdp2():
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
    mesh = ed.context().mesh(("dp", "tp"))
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


def pipeline(schedule="1F1B", microbatches=4, group=None):
    """Two stages (group ranks 0 and 1), the whole batch in microbatches."""
    r = dist.get_rank(group)
    model = mlp()
    part = model[:2] if r == 0 else model[2:]
    stage = PipelineStage(part, r, 2, torch.device("cpu"), group=group)
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


def ddp_overlap(steps=3):
    """DDP with small buckets on a deeper model: emulated communication and the part of it the
    compute lane waited for, from the second step on (after DDP has rebuilt its buckets)."""
    eng = ed.context().engine
    torch.manual_seed(0)
    model = DDP(nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(64, 64), nn.ReLU())]), bucket_cap_mb=0.01)
    x = torch.randn(32, 64)
    for step in range(steps):
        if step == 1:
            ed.restart_clocks()
            e0, n0 = eng.exposed_s, len(eng.spans)
        model(x).pow(2).mean().backward()
        sgd(model.parameters())
    ops = [s for s in eng.spans[n0:] if s[0] == "all_reduce"]
    return {"comm_s": sum(e - a for _, a, e, _ in ops), "exposed_comm_s": eng.exposed_s - e0, "all_reduces": len(ops)}


def all_programs():
    """Every program above in one launch on 4 devices (two pipelines side by side)."""
    r = dist.get_rank()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    return {"ddp": ddp(), "fsdp2": fsdp2(), "tp": tensor_parallel_2d(), "moe": moe(),
            "pipeline": pipeline(group=groups[r // 2]), "overlap": ddp_overlap()}


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


# ---------------------------------------------------------------- every operation, checked
DTYPES = (torch.float32, torch.bfloat16, torch.int64)


def every_operation():
    """Each operation on each dtype, against a reference computed directly (every rank can make
    every rank's input). Small integers: any summation order gives the reference bit for bit.
    Returns (mismatches, timings); a timing is (primitive, group, nbytes, dtype, options, end)
    of one collective started from emulated 0 on every device (restart_clocks)."""
    eng = ed.context().engine
    r, w = dist.get_rank(), dist.get_world_size()
    bad, times = [], []

    def check(name, got, want):
        if not (got.dtype == want.dtype and torch.equal(got, want)):
            bad.append(f"rank {r}: {name}: got {got.tolist()} want {want.tolist()}")

    def timed(primitive, group, nbytes, dtype, options, run):
        ed.restart_clocks()
        run()
        members = dist.get_process_group_ranks(group) if group is not None else list(range(w))
        end = eng.spans[-1][2] if r in members else None
        times.append((primitive, members, nbytes, str(dtype).split(".")[1], options, end))

    for k, dt in enumerate(DTYPES):
        g = torch.Generator().manual_seed(k)
        n = 2 * w + 1
        xs = [torch.randint(-4, 5, (n,), generator=g).to(dt) for _ in range(w)]
        es = dt.itemsize if hasattr(dt, "itemsize") else torch.tensor([], dtype=dt).element_size()
        total = torch.stack(xs).sum(0)
        ops = {"sum": total, "max": torch.stack(xs).amax(0), "min": torch.stack(xs).amin(0)}
        if dt.is_floating_point:
            ops["avg"] = total / w
        for op, want in ops.items():
            t = xs[r].clone()
            timed("all_reduce", None, n * es, dt, {}, lambda: dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper())))
            check(f"all_reduce {op} {dt}", t, want)
        signs = [torch.tensor([(-1, 1, 2)[(i * 7 + j + k) % 3] for j in range(n)]).to(dt) for i in range(w)]
        t = signs[r].clone()
        dist.all_reduce(t, op=dist.ReduceOp.PRODUCT)
        check(f"all_reduce product {dt}", t, torch.stack(signs).prod(0).to(dt))
        t = xs[r].clone()
        timed("broadcast", None, n * es, dt, {"root": w - 1}, lambda: dist.broadcast(t, src=w - 1))
        check(f"broadcast {dt}", t, xs[w - 1])
        t = xs[r].clone()
        dist.reduce(t, dst=0)
        if r == 0:
            check(f"reduce {dt}", t, total)
        outs = [torch.empty(n, dtype=dt) for _ in range(w)]
        dist.all_gather(outs, xs[r])
        check(f"all_gather {dt}", torch.cat(outs), torch.cat(xs))
        out = torch.empty(w * n, dtype=dt)
        timed("all_gather", None, w * n * es, dt, {}, lambda: dist.all_gather_into_tensor(out, xs[r]))
        check(f"all_gather_into_tensor {dt}", out, torch.cat(xs))
        big = [torch.cat([x] * w) + i for i, x in enumerate(xs)]  # w * n elements per rank
        out = torch.empty(n, dtype=dt)
        timed("reduce_scatter", None, w * n * es, dt, {}, lambda: dist.reduce_scatter_tensor(out, big[r]))
        check(f"reduce_scatter_tensor {dt}", out, torch.stack(big).sum(0).chunk(w)[r])
        out = torch.empty(n, dtype=dt)
        dist.reduce_scatter(out, list(big[r].chunk(w)))
        check(f"reduce_scatter {dt}", out, torch.stack(big).sum(0).chunk(w)[r])
        # all-to-all, even and uneven (some blocks empty)
        out = torch.empty(w * n, dtype=dt)
        timed("all_to_all", None, w * n * es, dt, {}, lambda: dist.all_to_all_single(out, big[r]))
        check(f"all_to_all_single even {dt}", out, torch.cat([b.chunk(w)[r] for b in big]))
        S = [[(i + 2 * j) % 3 for j in range(w)] for i in range(w)]
        src = [torch.arange(sum(S[i])).to(dt) + 10 * i for i in range(w)]
        out = torch.empty(sum(S[i][r] for i in range(w)), 2, dtype=dt)
        rows = lambda i: [2 * x for x in S[i]]  # noqa: E731
        want = torch.cat([src[i].repeat_interleave(2).split(rows(i))[r] for i in range(w)]).view(-1, 2)
        mine = src[r].repeat_interleave(2).view(-1, 2)
        timed("all_to_all", None, None, dt, {"splits": [[2 * x for x in row] for row in S]},
              lambda: dist.all_to_all_single(out, mine, [S[i][r] for i in range(w)], S[r]))
        check(f"all_to_all_single uneven {dt}", out, want)
        outs = [torch.empty(S[i][r], dtype=dt) for i in range(w)]
        dist.all_to_all(outs, list(src[r].split(S[r])))
        check(f"all_to_all {dt}", torch.cat(outs), torch.cat([src[i].split(S[i])[r] for i in range(w)]))
        # rooted
        outs = [torch.empty(n, dtype=dt) for _ in range(w)] if r == 0 else None
        dist.gather(xs[r], outs, dst=0)
        if r == 0:
            check(f"gather {dt}", torch.cat(outs), torch.cat(xs))
        out = torch.empty(n, dtype=dt)
        dist.scatter(out, [x.clone() for x in xs] if r == 0 else None, src=0)
        check(f"scatter {dt}", out, xs[r])
        # point to point: a ring both ways, async, and batched
        got = torch.empty(n, dtype=dt)
        works = [dist.isend(xs[r], (r + 1) % w), dist.irecv(got, (r - 1) % w)]
        for wk in works:
            wk.wait()
        check(f"isend/irecv {dt}", got, xs[(r - 1) % w])
        got = torch.empty(n, dtype=dt)
        for wk in dist.batch_isend_irecv([dist.P2POp(dist.irecv, got, (r + 1) % w),
                                          dist.P2POp(dist.isend, xs[r], (r - 1) % w)]):
            wk.wait()
        check(f"batch_isend_irecv {dt}", got, xs[(r + 1) % w])
        if w > 1 and r < 2:
            got = torch.empty(n, dtype=dt)
            if r == 0:
                dist.send(xs[0], 1)
            else:
                dist.recv(got, 0)
                check(f"send/recv {dt}", got, xs[0])
        dist.barrier()
        # sub-groups: the first scale-up domain, and one member of each domain
        dom = ed.context().domain
        for members in (list(range(dom)), list(range(0, w, dom))):
            grp = dist.new_group(members)
            if len(members) < 2:
                continue
            t = xs[r].clone()
            timed("all_reduce", grp, n * es, dt, {}, lambda: dist.all_reduce(t, group=grp) if r in members else None)
            if r in members:
                check(f"all_reduce on {members} {dt}", t, torch.stack([xs[m] for m in members]).sum(0))
            out = torch.empty(len(members) * n, dtype=dt)
            if r in members:
                dist.all_to_all_single(out, torch.cat([xs[r]] * len(members)), group=grp)
                check(f"all_to_all_single on {members} {dt}", out, torch.cat([xs[m] for m in members]))
    return bad, times


# ---------------------------------------------------------------- tensors smaller than the group
SMALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int32, torch.bool)
REDUCE_OPS = ("sum", "avg", "max", "min", "product")


def _reference(op, xs):
    """torch's reduction of the ranks' tensors `xs` with `op`, in their dtype (bool: sum and max
    are any, product and min all; an average truncates integers, as gloo's)."""
    s = torch.stack(xs)
    if s.dtype == torch.bool:
        return s.any(0) if op in ("sum", "max") else s.all(0)
    want = {"sum": s.sum(0), "max": s.amax(0), "min": s.amin(0), "product": s.prod(0)}.get(op)
    if op == "avg":
        want = s.sum(0) / len(xs) if s.is_floating_point() else torch.div(s.sum(0), len(xs), rounding_mode="trunc")
    return want.to(s.dtype)


def small_tensors():
    """Every operation on tensors of 0, 1, world-1 and world+1 elements (fewer than the group:
    some ranks' shares are empty) in every dtype, against references computed directly. Returns
    the mismatches; the first operation that raises ends the run with its error as the last."""
    r, w = dist.get_rank(), dist.get_world_size()
    bad = []

    def check(name, got, want):
        if not (got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)):
            bad.append(f"rank {r}: {name}: got {got.tolist()} want {want.tolist()}")

    def inputs(n, dt, seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, 2, (n,), generator=g).bool() if dt == torch.bool
                else torch.randint(-3, 4, (n,), generator=g).to(dt) for _ in range(w)]

    name = ""
    try:
        for k, dt in enumerate(SMALL_DTYPES):
            for n in sorted({0, 1, w - 1, w + 1}):
                xs = inputs(n, dt, 100 * k + n)
                for op in REDUCE_OPS:
                    red = getattr(dist.ReduceOp, op.upper())
                    if op == "avg" and dt == torch.bool:  # refused, on the program's thread
                        name = f"all_reduce avg {dt}: refused"
                        try:
                            dist.all_reduce(xs[r].clone(), op=red)
                            bad.append(f"rank {r}: {name}: it ran")
                        except ValueError as e:
                            assert "AVG of a bool tensor" in str(e), e
                        continue
                    name = f"all_reduce {op} {dt} numel {n}"
                    t = xs[r].clone()
                    dist.all_reduce(t, op=red)
                    check(name, t, _reference(op, xs))
                    name = f"reduce {op} {dt} numel {n}"
                    t = xs[r].clone()
                    dist.reduce(t, dst=w - 1, op=red)
                    check(name, t, _reference(op, xs) if r == w - 1 else xs[r])
                    big = inputs(w * n, dt, 100 * k + n + 50)  # each rank's input: w x the output
                    want = _reference(op, big).chunk(w)[r] if n else torch.empty(0, dtype=dt)
                    name = f"reduce_scatter_tensor {op} {dt} numel {n}"
                    out = torch.empty(n, dtype=dt)
                    dist.reduce_scatter_tensor(out, big[r], op=red)
                    check(name, out, want)
                    name = f"reduce_scatter {op} {dt} numel {n}"
                    out = torch.empty(n, dtype=dt)
                    dist.reduce_scatter(out, list(big[r].split(n)) if n else [big[r]] * w, op=red)
                    check(name, out, want)
                name = f"broadcast {dt} numel {n}"
                t = xs[r].clone()
                dist.broadcast(t, src=w - 1)
                check(name, t, xs[w - 1])
                name = f"all_gather {dt} numel {n}"
                outs = [torch.empty(n, dtype=dt) for _ in range(w)]
                dist.all_gather(outs, xs[r])
                check(name, torch.cat(outs), torch.cat(xs))
                name = f"all_gather_into_tensor {dt} numel {n}"
                out = torch.empty(w * n, dtype=dt)
                dist.all_gather_into_tensor(out, xs[r])
                check(name, out, torch.cat(xs))
                name = f"all_to_all_single {dt} numel {n}"
                big = inputs(w * n, dt, 100 * k + n + 60)
                out = torch.empty(w * n, dtype=dt)
                dist.all_to_all_single(out, big[r])
                check(name, out, torch.cat([b.chunk(w)[r] if n else b for b in big]))
                name = f"all_to_all uneven {dt} numel {n}"  # rank i sends n - ... elements: some blocks empty
                sizes = [[(i + j) % (n + 1) for j in range(w)] for i in range(w)]
                src = [torch.cat(inputs(sum(sizes[i]), dt, 100 * k + n + 70 + i)[:1]) for i in range(w)]
                outs = [torch.empty(sizes[i][r], dtype=dt) for i in range(w)]
                dist.all_to_all(outs, list(src[r].split(sizes[r])))
                check(name, torch.cat(outs), torch.cat([src[i].split(sizes[i])[r] for i in range(w)]))
                name = f"gather {dt} numel {n}"
                outs = [torch.empty(n, dtype=dt) for _ in range(w)] if r == 0 else None
                dist.gather(xs[r], outs, dst=0)
                if r == 0:
                    check(name, torch.cat(outs), torch.cat(xs))
                name = f"scatter {dt} numel {n}"
                out = torch.empty(n, dtype=dt)
                dist.scatter(out, [x.clone() for x in xs] if r == 0 else None, src=0)
                check(name, out, xs[r])
                name = f"isend/irecv {dt} numel {n}"
                got = torch.empty(n, dtype=dt)
                for wk in [dist.isend(xs[r], (r + 1) % w), dist.irecv(got, (r - 1) % w)]:
                    wk.wait()
                check(name, got, xs[(r - 1) % w])
    except Exception as e:  # noqa: BLE001 (the first failure is the finding; later ones follow from it)
        bad.append(f"rank {r}: {name}: raised {type(e).__name__}: {e}")
    return bad


def rendezvous_servers():
    """(address, port) of what this device's process listens on at MASTER_PORT, with the default
    group initialised (torch.distributed's rendezvous store, where device 0 serves it)."""
    import os

    import psutil
    dist.barrier()
    port = int(os.environ["MASTER_PORT"])
    return sorted((c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("inet")
                  if c.status == psutil.CONN_LISTEN and c.laddr.port == port)
