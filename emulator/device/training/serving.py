"""A serving step on one device (a function run on a device worker): one prefill or one decode
step of a language model (workloads/inference.py) under large-scale EP serving's layout, as a
`relay` program on fake tensors, so that a full system's step runs device by device or shared
(driver/serving.py: one worker records the one role, every device is replayed from it).

The layout is the serving model's (analytic/serving.py), tp = 1: attention data parallel over
every device (each its own `batch` sequences), routed experts over `ep` devices, ceil(n_experts /
ep) each, shared experts replicated. Each MoE block is an `EPShard` whose dispatch and combine
are all-to-alls through the `relay` backend over the device's ep group (balanced routing: every
device sends and receives tokens x top_k rows), so the communication is timed by the backend's
executor on the calibrated fabric rather than by a closed form, and the compute is charged op by
op by the device's throttle, the same cost model as the serving model's measured blocks.

`micro = 2` runs two micro-batches (half the sequences each) as DeepSeek's dual micro-batch
overlap and SGLang's two-batch overlap do: each block's attention and routing of one half while
the other's dispatch or combine is in flight, then both halves' experts. Its cost is real: every
weight is read once per micro-batch and every kernel launched twice.
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass, replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed.device_mesh import init_device_mesh
from torch.utils._python_dispatch import _disable_current_modes

import relay.dist as relay_dist
from relay.device.backend.program import Program, run_program
from relay.device.fake.ops import FreshOps
from relay.device.fake.program import eager
from relay.device.fake.record import Recorder
from relay.device.job import Job
from relay.device.training.parallel import step_row
from relay.parallel import DIMS, Parallel
from relay.workloads import get as get_workload
from relay.workloads import inference
from relay.workloads.inference import EPShard
from relay.workloads.moe import only_experts


@dataclass(frozen=True)
class Step:
    """One serving step on every device: `batch` sequences per device, `tokens` each (1: a decode
    step after context - 1 cached tokens; 1 + drafts: a decode step verifying multi-token
    prediction drafts, every position sampled, after context - tokens; more: a prefill of that
    many from an empty cache)."""

    workload: str
    dp: int  # devices (attention data parallel, tp = 1)
    ep: int  # devices the routed experts are spread over (divides dp)
    batch: int
    tokens: int
    context: int
    micro: int = 1  # 2: two micro-batches overlap the all-to-alls with compute
    graphs: bool = False  # run as a captured graph: every kernel at kernels/graphs.py's launch cost
    drafts: int = 0  # decode: MTP drafts verified with the token (analytic/mtp.py: 1), tokens = 1 + drafts

    @property
    def plan(self) -> Parallel:
        """The serving layout as a plan's mesh: its ep groups are the expert all-to-all's."""
        return Parallel(dp=self.dp, ep=self.ep)

    @property
    def phase(self) -> str:
        return "decode" if self.tokens == 1 + self.drafts else "prefill"


def run(dev, job: Job, step: Step, master: tuple) -> dict:
    """This device's row of the step (one process per device)."""
    out = run_program(dev, job, Program(_serve, (dev, job, step), master=master, gpu=False))
    return {"device": dev.index, "rows": out["result"]["rows"]}


def record(dev, job: Job, step: Step, device: int) -> dict:
    """The step of `device`'s role, recorded on this worker alone (fake/record.py, driver/serving.py)."""
    out = run_program(dev, job, Program(_serve, (dev, job, step), gpu=False), device=device, engine_class=Recorder)
    return {"device": device, "rows": out["result"]["rows"], "recording": out["result"]["recording"],
            "real_s": out["real_s"]}


def _model(step: Step, group, rank: int):
    """The workload's model on the meta device, each MoE block an EPShard of this device's experts."""
    c = get_workload(step.workload).config
    c = replace(c, seq_len=max(c.seq_len, step.context, step.tokens))
    family = importlib.import_module(type(c).__module__)
    local = math.ceil(c.n_experts / step.ep) if hasattr(c, "n_experts") else 0
    with _disable_current_modes(), torch.device("meta"), only_experts(range(0)):
        model = family.workload(step.workload, c).build_model()
        for block in model.blocks:
            if hasattr(block.ffn, "routing"):
                # the dispatch and combine move bf16 rows, as served (DeepEP in BF16), though the
                # host's fake tensors are fp32 (the cost model charges them at the emulated dtype)
                block.ffn = EPShard(c, local, group if step.ep > 1 else None, wire=torch.bfloat16)
    return model


def _serve(dev, job: Job, step: Step) -> dict:
    ctx = relay_dist.context()
    engine, throttle, compute = ctx.engine, ctx.throttle, ctx.engine.compute
    plan = step.plan
    with throttle.pause():  # (a mesh's device table is a tensor: made real, before any fake mode)
        mesh = init_device_mesh("cpu", plan.shape, mesh_dim_names=DIMS)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    throttle.fresh = FreshOps(mode)
    try:
        with mode, eager(engine):
            with throttle.pause():
                model = _model(step, mesh.get_group("ep"), ctx.rank)
                # (to_empty's empty_like converts each meta tensor to a fake one first: 3x the host time)
                model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device="cpu"))
                cache = inference.new_cache(model, step.batch, max(step.context, step.tokens))
                cache.length = step.context - step.tokens if step.phase == "decode" else 0
                idx = torch.zeros(step.batch, step.tokens, dtype=torch.long)
            r0, t0, c0, f0 = time.time(), compute.measure(), throttle.emulated_s, throttle.flops
            n0, e0, w0 = len(engine.spans), engine.exposed_s, engine.recv_wait_s
            engine.mark("start")
            with torch.no_grad():
                forward(model, idx, cache, step.micro, 1 + step.drafts if step.phase == "decode" else 1)
            t_end, t_sched = compute.now(), compute.scheduled()
            engine.mark("backward")  # (the rows' marks: no backward, the step ends here)
            t1 = compute.measure()
            engine.mark("end")
            with throttle.pause(), unset_fake_temporarily():
                engine.drain()  # the step's spans are all in
            row = step_row(0, (t0, t_end, t_sched, t1), engine.spans[n0:], throttle.emulated_s - c0,
                           throttle.flops - f0, (engine.exposed_s - e0) - (engine.recv_wait_s - w0),
                           engine.recv_wait_s - w0)
            row.update({"loss": float("nan"), "local_loss": None, "routing": [], "wall_s": time.time() - r0})
    finally:
        throttle.fresh = None
    return {"rows": [row], "recording": engine.recording_of() if engine.recording else None}


def forward(model, idx: torch.Tensor, cache, micro: int = 1, sample: int = 1) -> torch.Tensor:
    """inference.forward (`sample`: the last positions reaching the head, 2 verifying a draft), or
    with micro = 2 two micro-batches of half the sequences each: each
    block's attention (and routing: the dispatch issued) of the first half, then of the second,
    then both halves' experts (the combines issued); a half's combine is waited for only when its
    next block's attention needs it. So one half's all-to-all runs while the other computes."""
    if micro == 1 or idx.shape[0] < 2:
        return inference.forward(model, idx, cache, sample)
    start, T = cache.length, idx.shape[1]
    cos, sin = inference.rotary(model, cache, T, sample - 1)
    h = idx.shape[0] // 2
    halves = (slice(0, h), slice(h, idx.shape[0]))
    layers = [[kv[s] if isinstance(kv, torch.Tensor) else tuple(t[s] for t in kv) for kv in cache.layers]
              for s in halves]
    xs = [model.tok(idx[s]) for s in halves]
    pending: list = [None, None]  # per half: (the MoE block, its state) whose combine is in flight
    for i, block in enumerate(model.blocks):
        moe = isinstance(block.ffn, EPShard) and block.ffn.group is not None
        for m in (0, 1):
            if pending[m] is not None:
                xs[m] = xs[m] + pending[m][0].finish(pending[m][1])
                pending[m] = None
            xs[m] = inference.attention(block, xs[m], cos, sin, layers[m][i], start)
            if moe:
                pending[m] = (block.ffn, block.ffn.start(block.ffn_norm(xs[m])))
            else:
                xs[m] = xs[m] + block.ffn(block.ffn_norm(xs[m]))
        if moe:
            for m in (0, 1):
                block.ffn.expert_rows(pending[m][1])
    for m in (0, 1):
        if pending[m] is not None:
            xs[m] = xs[m] + pending[m][0].finish(pending[m][1])
    cache.length = start + T
    logits = model.head(model.norm(torch.cat([x[:, -sample:] for x in xs])))
    return logits[:, 0] if sample == 1 else logits
