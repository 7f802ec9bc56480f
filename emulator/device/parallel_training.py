"""Training under a parallelism plan on one device (a function run on a device worker): a
`relay` program (program.py: the engine, CommThrottle, the default group) that builds the
workload's model, applies the plan (plans.py) on one DeviceMesh, and trains.

Each step's row has the data-parallel trainer's columns (device/training.py), in emulated
seconds: the step on the compute lane (start, end), compute (charged op costs), communication
(the backend's operations of the step, summed), exposed communication (how long the compute
lane waited for them), the global batch's loss, FLOPs, wall seconds and the spans for the
trace. Waiting on a pipeline neighbour's receive (its compute, mostly: the bubble) is
`pipeline_wait_s`, not exposed communication; the step's `other_s` includes it. The loss is
summed over the devices that computed one (the last pipeline stage) by a control all-reduce,
outside emulated time.
"""

from __future__ import annotations

import time

import torch
from torch.distributed.device_mesh import init_device_mesh

import emulator.dist as relay_dist
from emulator.device import plans
from emulator.device.job import Job, die
from emulator.device.program import Program, run_program
from emulator.parallel import DIMS
from emulator.trainer import Optimizer, TrainConfig


def train(dev, job: Job, config: TrainConfig) -> dict:
    """Per-step rows of this device, and the parts of the final weights it holds in full."""
    dev.rows = []
    algorithm = None if config.algorithm == "auto" else {"all_reduce": config.algorithm}
    out = run_program(dev, job, Program(_train, (dev, job, config), algorithm=algorithm))
    return {"device": dev.index, "rows": out["result"]["rows"], "state_dict": out["result"]["state"],
            "fidelity": out["fidelity"], "overrun_s": out["overrun_s"]}


class _Model:
    """The plan applied: what this device calls, steps and reports."""

    def __init__(self, config: TrainConfig, rank: int):
        plan = self.plan = config.parallel
        self.at = plan.coords(rank)
        mesh = init_device_mesh("cpu", plan.shape, mesh_dim_names=DIMS)
        dp_mesh = mesh["dp_outer", "ep"]._flatten("dp")
        self.dp_group, self.expert_group = dp_mesh.get_group(), mesh.get_group("dp_outer")
        torch.manual_seed(config.seed)  # every device builds the same whole model, then keeps its part
        model = config.workload.build_model()
        self.experts = plans.expert_parallel(model, mesh.get_group("ep"), plan.ep, self.at["ep"]) \
            if plan.ep > 1 else []
        self.offset = self.at["ep"] * model.config.n_experts // plan.ep if plan.ep > 1 else 0
        self.first, self.last = self.at["pp"] == 0, self.at["pp"] == plan.pp - 1
        part = plans.stage_of(model, self.at["pp"], plan.pp) if plan.pp > 1 else model
        blocks = list(part.blocks.values() if plan.pp > 1 else part.blocks) if hasattr(part, "blocks") else []
        if plan.tp > 1:
            plans.tensor_parallel(blocks, mesh["tp"], plan.tp)
        if plan.recompute:
            plans.recompute(blocks)
        self.part = part  # the unwrapped module: its state is the weights this device holds
        self.module, self.by_hand = plans.data_parallel(part, blocks, plan, dp_mesh, self.experts, config.bucket_mb)
        self.schedule = plans.pipeline(self.module, self.at["pp"], plan, mesh.get_group("pp")) if plan.pp > 1 \
            else None
        self.opt = Optimizer(config.optimizer_used, self.module.parameters(), config.lr_used)
        experts = set(self.experts)
        self.shared = [p for p in self.module.parameters() if p not in experts]  # averaged by hand if by_hand

    def step(self, loss_fn, batch) -> float | None:
        """Forward and backward of one replica's batch; the loss where this device has it."""
        if self.schedule is None:
            loss = loss_fn(self.module, batch)
            loss.backward()
            local = float(loss.detach())
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
            local = float(torch.stack([x.detach() for x in losses]).mean()) if losses else None
        if self.by_hand:
            plans.average_gradients(self.shared, self.dp_group)
        if self.experts:
            plans.sync_experts(self.experts, self.expert_group, self.plan.dp)
        return local


def _train(dev, job: Job, config: TrainConfig) -> dict:
    ctx = relay_dist.context()
    rank, engine, throttle, transport = ctx.rank, ctx.engine, ctx.throttle, dev.transport
    compute, world, wl = engine.compute, ctx.world, config.workload
    with throttle.pause():  # setting up is not part of any step
        m = _Model(config, rank)
    batch_size = config.batch_for(config.parallel.dp)
    data = wl.batches(m.at["dp"], config.parallel.dp, batch_size, config.seed)
    rows = []
    for step in range(config.steps):
        if job.faults.fails_here(rank, step):
            die()
        with throttle.pause():
            batch = next(data)
        r0, t0, c0, f0 = time.time(), compute.measure(), throttle.emulated_s, throttle.flops
        n0, e0, w0 = len(engine.spans), engine.exposed_s, engine.recv_wait_s
        throttle.batch_scale = config.batch_scale  # forward and backward scale with the batch ...
        local = m.step(wl.loss, batch)
        throttle.batch_scale = 1.0  # ... the optimizer step does not
        t_bwd = compute.now()
        t_opt = compute.scheduled()
        m.opt.step()
        m.opt.zero_grad()
        t1 = compute.measure()
        spans = engine.spans[n0:]
        with throttle.pause():
            engine.drain()  # the transport is the engine thread's until then
            total, holders = transport.total([local or 0.0, 1.0 if local is not None else 0.0], world)
        row = {"step": step, "loss": total / holders, "local_loss": local, "start_s": t0, "end_s": t1,
               "compute_s": throttle.emulated_s - c0, "comm_s": sum(e - s for _, s, e, _ in spans),
               "exposed_comm_s": (engine.exposed_s - e0) - (engine.recv_wait_s - w0),
               "pipeline_wait_s": engine.recv_wait_s - w0, "flops": throttle.flops - f0, "wall_s": time.time() - r0,
               "spans": {"forward+backward": (t0, t_bwd), "optimizer": (t_opt, t1)}}
        for name, s, e, _ in spans:
            row["spans"].setdefault(name, []).append((s, e))
        rows.append(row)
        dev.report(row)
    with throttle.pause():
        state = plans.full_state(m.part, m.offset)
    keep = m.at["dp_outer"] == 0 and m.at["tp"] == 0  # one copy of each tensor is enough
    return {"rows": rows, "state": state if keep else {}}
