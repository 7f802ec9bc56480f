"""Training under a parallelism plan on one device (a function run on a device worker): a
`relay` program (program.py: the engine, CommThrottle, the default group) that builds the
workload's model, applies the plan (plans.py) on one DeviceMesh, and trains.

Each step's row has the data-parallel trainer's columns (device/training/loop.py), in emulated
seconds: the step on the compute lane (start, end), compute (charged op costs), communication
(the backend's operations of the step, summed), exposed communication (how long the compute
lane waited for them), the global batch's loss, FLOPs, wall seconds and the spans for the
trace. Waiting on a pipeline neighbour's receive (its compute, mostly: the bubble) is
`pipeline_wait_s`, not exposed communication; the step's `other_s` includes it. The loss is
summed over the devices that computed one (the last pipeline stage) by a control all-reduce,
outside emulated time.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp._fully_shard import _fsdp_param
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_map

import relay.dist as relay_dist
from relay.device.backend.program import Program, run_program
from relay.device.fake.ops import FreshOps
from relay.device.fake.program import eager
from relay.device.fake.record import Recorder
from relay.device.job import Job, die
from relay.device.training import experts as experts_plan
from relay.device.training import plans
from relay.parallel import DIMS
from relay.trainer import Optimizer, TrainConfig
from relay.workloads import checkpoint
from relay.workloads.moe import MoE, only_experts
from relay.workloads.routing import balanced


def train(dev, job: Job, config: TrainConfig, master: tuple) -> dict:
    """Per-step rows of this device, and the parts of the final weights it holds in full.
    `master`: the rendezvous address of torch.distributed's default group."""
    dev.rows = []
    algorithm = None if config.algorithm == "auto" else {"all_reduce": config.algorithm}
    out = run_program(dev, job, Program(_train, (dev, job, config), algorithm=algorithm, master=master, gpu=False))
    return {"device": dev.index, "rows": out["result"]["rows"], "state_dict": out["result"]["state"],
            "fidelity": out["fidelity"], "overrun_s": out["overrun_s"]}


class _Model:
    """The plan applied: what this device calls, steps and reports. On fake tensors (`mode`, a
    FakeTensorMode, active while this is built and used) the model is made on the meta device and
    materialised as fake tensors, at any size; its MoE layers route by the run's routing model."""

    def __init__(self, config: TrainConfig, rank: int, meshes: tuple, mode=None):
        plan = self.plan = config.parallel
        self.at = plan.coords(rank)
        mesh, dp_mesh, tp_mesh = meshes
        self.expert_group = mesh.get_group("dp_outer")
        torch.manual_seed(config.seed)  # every device builds the same whole model, then keeps its part
        if mode is None:
            model = config.workload.build_model()
        else:
            experts = getattr(getattr(config.workload, "config", None), "n_experts", 0)
            kept = range(self.at["ep"] * experts // plan.ep, (self.at["ep"] + 1) * experts // plan.ep) \
                if plan.ep > 1 else None  # the experts this device keeps (experts.expert_parallel): built alone
            # shapes only, outside every mode (the throttle's and fake mode's dispatch of each
            # parameter's initialisation on the meta device costs seconds at full size)
            with _disable_current_modes(), torch.device("meta"), only_experts(kept):
                model = config.workload.build_model()
            # (to_empty's empty_like converts each meta tensor to a fake one first: 3x the host time)
            model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device="cpu"))
            for layer in model.modules():
                if isinstance(layer, MoE):
                    layer.routing = config.routing or balanced()
        experts = experts_plan.expert_parallel(model, mesh.get_group("ep"), plan.ep, self.at["ep"]) \
            if plan.ep > 1 else []
        self.offset = self.at["ep"] * model.config.n_experts // plan.ep if plan.ep > 1 else 0
        self.first, self.last = self.at["pp"] == 0, self.at["pp"] == plan.pp - 1
        indices = plans.chunks_of(plan, self.at["pp"])  # this device's stages (one unless interleaved)
        parts = [plans.stage_of(model, i, plan.pp * plan.n_stages) for i in indices] if plan.pp > 1 else [model]
        blocks = []
        for part in parts:
            mine = list(part.blocks.values() if plan.pp > 1 else part.blocks) if hasattr(part, "blocks") else []
            if plan.tp > 1:
                plans.tensor_parallel(mine, tp_mesh, plan.tp, plan.sp)
                plans.vocab_parallel(part, tp_mesh)
            blocks += mine
        checkpoint.apply(blocks, plan)  # (layer:N counts the device's blocks over its chunks)
        self.parts = parts  # the unwrapped modules: their state is the weights this device holds
        held = {id(p) for part in parts for p in part.parameters()}
        experts = [p for p in experts if id(p) in held]  # (its pipeline stages' experts only)
        # with fsdp, experts are sharded over the replicas that hold them (plans.data_parallel);
        # otherwise summed over them after backward (experts.sync_experts)
        shard = plan.shards_experts
        self.experts = [] if shard else experts
        with unset_fake_temporarily(), (_own_chunks() if mode else contextlib.nullcontext()):
            # (FSDP2 over tensor parallel builds a mesh: its device table is real)
            self.buckets = plans.data_parallel(parts, blocks, plan, dp_mesh, self.experts, config.bucket_mb,
                                               mesh["dp_outer"] if shard else None)
        self.module = parts[0]
        self.schedule = None
        if plan.pp > 1:
            c = model.config
            micro = (config.batch_for(plan.dp) // plan.n_microbatches, c.seq_len)
            dtype = next(model.parameters()).dtype
            self.schedule = plans.pipeline(parts, indices, plan, mesh.get_group("pp"), micro, c.dim,
                                           c.vocab_size, dtype)
        self.opt = Optimizer(config.optimizer_used, [p for part in parts for p in part.parameters()],
                             config.lr_used)

    def step(self, loss_fn, batch) -> list:
        """Forward and backward of one replica's batch; the losses this device has (the last
        pipeline stage's, one per microbatch). Without a pipeline, `batch` is the list of its
        microbatches (gradient accumulation): each one's forward and backward, the gradients
        synchronised over the replicas in the last one's backward only under DDP (no_sync), in
        every one's under FSDP2 (reduce-scattered into the shards, as torchtitan accumulates:
        the whole gradients are never held), each loss scaled by 1 / microbatches so that the gradients
        are the mean over the replica's batch. Under tensor parallel the logits are sharded on the
        vocabulary: forward and backward run inside `loss_parallel` (plans.vocab_parallel)."""
        with loss_parallel() if self.plan.tp > 1 else contextlib.nullcontext():
            losses = self._forward_backward(loss_fn, batch)
        if self.buckets is not None:
            self.buckets.finish()
        if self.plan.sp:
            plans.sum_partial_grads(self.opt.params)
        if self.experts:
            experts_plan.sync_experts(self.experts, self.expert_group, self.plan.dp)
        return [plans.local(x) for x in losses]  # (a DTensor loss: its value, the same on every device)

    def _forward_backward(self, loss_fn, batch) -> list:
        if self.schedule is None:
            losses = []
            for i, micro in enumerate(batch):
                self._sync_gradients(i == len(batch) - 1)
                loss = loss_fn(self.module, micro)
                (loss / len(batch) if len(batch) > 1 else loss).backward()
                losses.append(loss)
        else:
            idx, targets = batch
            losses = []
            if self.first and self.last:
                self.schedule.step(idx, target=targets, losses=losses)
            elif self.first:
                self.schedule.step(idx)
            elif self.last:
                self.schedule.step(target=targets, losses=losses)
            else:
                self.schedule.step()
        return losses

    def _sync_gradients(self, sync: bool) -> None:
        if self.buckets is not None:
            self.buckets.sync = sync


def microbatches(batch, m: int) -> list:
    """A replica's batch (a tensor or a tuple of them, samples first) as m equal microbatches."""
    if m == 1:
        return [batch]
    if isinstance(batch, (tuple, list)):
        return [type(batch)(parts) for parts in zip(*(t.chunk(m) for t in batch))]
    return list(batch.chunk(m))


def _train(dev, job: Job, config: TrainConfig) -> dict:
    ctx = relay_dist.context()
    with ctx.throttle.pause():  # (a mesh's device table is a tensor: made real, before any fake mode)
        mesh = init_device_mesh("cpu", config.parallel.shape, mesh_dim_names=DIMS)
        meshes = (mesh, mesh["dp_outer", "ep"]._flatten("dp"), mesh["tp"])
    # fake tensors: the mode stays active for the whole run (below the throttle: FakeTensorMode is
    # an infrastructure mode, always last on the dispatch stack, so the throttle still sees every op)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if config.fake else None
    ctx.throttle.fresh = FreshOps(mode) if mode else None  # fake mode's answers, remembered (fake_ops.py)
    try:
        with (mode or contextlib.nullcontext()), (eager(ctx.engine) if mode else contextlib.nullcontext()):
            return _steps(dev, job, config, ctx, meshes, mode)
    finally:
        ctx.throttle.fresh = None


@contextlib.contextmanager
def _own_chunks():
    """FSDP2 cuts each parameter into torch.chunk's pieces, one per data-parallel rank, and keeps
    two (its own and the first, for the padded size): on fake tensors, at 384 ranks, the pieces it
    drops cost minutes of host time. Meanwhile each piece is made when asked for, the same view."""
    chunk = _fsdp_param._chunk_with_empty
    _fsdp_param._chunk_with_empty = _Chunks
    try:
        yield
    finally:
        _fsdp_param._chunk_with_empty = chunk


class _Chunks:
    """torch.chunk(tensor, n, dim) padded to n pieces with empty ones (FSDP2's _chunk_with_empty),
    each piece made on demand, once (FSDP2 asks for its own and the first: on rank 0, one piece)."""

    def __init__(self, tensor: torch.Tensor, n: int, dim: int):
        self.tensor, self.n, self.dim = tensor, n, dim
        self.size = -(-tensor.size(dim) // n)  # torch.chunk's piece size
        self.made: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(i)
        if i not in self.made:
            self.made[i] = self._piece(i)
        return self.made[i]

    def _piece(self, i: int) -> torch.Tensor:
        start, length = i * self.size, self.tensor.size(self.dim)
        if length == 0:  # (torch.chunk gives n empty pieces)
            return self.tensor.narrow(self.dim, 0, 0)
        if start >= length:
            return self.tensor.new_empty(0)
        return self.tensor.narrow(self.dim, start, min(self.size, length - start))


def step_row(step: int, marks: tuple, spans: list, compute_s: float, flops: float, exposed_s: float,
             pipeline_wait_s: float) -> dict:
    """One step's row from the compute lane's marks (start, end of backward, start of the optimizer,
    end), the spans of the step's operations (name, start, end, bytes) and the step's sums: the same
    for a device that ran and for one replayed (driver/shared.py). Sums over spans are exact
    (math.fsum), so they do not depend on the order spans were appended in."""
    t0, t_bwd, t_opt, t1 = marks
    row = {"step": step, "start_s": t0, "end_s": t1, "compute_s": compute_s,
           "comm_s": math.fsum(e - s for _, s, e, _ in spans), "exposed_comm_s": exposed_s,
           "pipeline_wait_s": pipeline_wait_s, "flops": flops,
           "spans": {"forward+backward": (t0, t_bwd), "optimizer": (t_opt, t1)}}
    for name, s, e, _ in spans:
        row["spans"].setdefault(name, []).append((s, e))
    return row


def _steps(dev, job: Job, config: TrainConfig, ctx, meshes: tuple, mode) -> dict:
    rank, engine, throttle, transport = ctx.rank, ctx.engine, ctx.throttle, dev.transport
    compute, world, wl = engine.compute, ctx.world, config.workload
    with throttle.pause():  # setting up is not part of any step
        m = _Model(config, rank, meshes, mode)
    batch_size = config.batch_for(config.parallel.dp)
    data = wl.batches(m.at["dp"], config.parallel.dp, batch_size, config.seed)
    rows = []
    for step in range(config.steps):
        if job.faults.fails_here(rank, step):
            die()
        with throttle.pause():
            batch = next(data)
            if mode is not None:
                batch = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, batch)
            if m.schedule is None:  # (the pipeline's schedule splits its own)
                batch = microbatches(batch, config.parallel.n_microbatches)
        r0, t0, c0, f0 = time.time(), compute.measure(), throttle.emulated_s, throttle.flops
        n0, e0, w0 = len(engine.spans), engine.exposed_s, engine.recv_wait_s
        engine.mark("start")
        throttle.batch_scale = config.batch_scale  # forward and backward scale with the batch ...
        losses = m.step(wl.loss, batch)
        throttle.batch_scale = 1.0  # ... the optimizer step does not
        t_bwd = compute.now()
        t_opt = compute.scheduled()
        engine.mark("backward")
        m.opt.step()
        m.opt.zero_grad()
        t1 = compute.measure()
        engine.mark("end")
        with throttle.pause(), unset_fake_temporarily():  # bookkeeping and control traffic, real numbers
            local = None if not losses or isinstance(losses[0], FakeTensor) else \
                float(torch.stack([x.detach() for x in losses]).mean())
            engine.drain()  # the transport is the engine thread's until then; the step's spans are all in
            total, holders = transport.total([local or 0.0, 1.0 if local is not None else 0.0], world) \
                if not engine.recording else (0.0, 0)
        row = step_row(step, (t0, t_bwd, t_opt, t1), engine.spans[n0:], throttle.emulated_s - c0,
                       throttle.flops - f0, (engine.exposed_s - e0) - (engine.recv_wait_s - w0),
                       engine.recv_wait_s - w0)
        row.update({"loss": total / holders if holders else float("nan"), "local_loss": local,
                    "routing": [list(layer.counts) for part in m.parts for layer in part.modules()
                                if isinstance(layer, MoE)],
                    "wall_s": time.time() - r0})
        rows.append(row)
        dev.report(row)
    with throttle.pause():
        state = {k: v for part in m.parts for k, v in plans.full_state(part, m.offset).items()} \
            if mode is None else {}
    keep = m.at["dp_outer"] == 0 and m.at["tp"] == 0  # one copy of each tensor is enough
    return {"rows": rows, "state": state if keep else {},
            "recording": engine.recording_of() if engine.recording else None}


def record(dev, job: Job, config: TrainConfig, device: int) -> dict:
    """The step of `device`'s role, recorded on this worker alone (record.py, driver/shared.py)."""
    algorithm = None if config.algorithm == "auto" else {"all_reduce": config.algorithm}
    out = run_program(dev, job, Program(_train, (dev, job, config), algorithm=algorithm, gpu=False), device=device,
                      engine_class=Recorder)
    return {"device": device, "rows": out["result"]["rows"], "recording": out["result"]["recording"],
            "real_s": out["real_s"]}
