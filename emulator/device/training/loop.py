"""Data-parallel training on one device (a function run on a device worker).

Every device builds the model from the same seed and then takes rank 0's weights (a broadcast),
trains on its shard of each global batch, and averages gradients with the chosen collective,
bucket by bucket, the way DDP does: with overlap, a bucket's all-reduce starts on the
*communication lane* as soon as its gradients are ready during the backward pass, while the
*compute lane* carries on; before the optimizer step the compute lane waits for the last bucket.
Each lane has its own clock (in wall mode the communication lane is a thread).

Per step and device we record, in emulated seconds: the step (compute lane, start to end),
compute (sum of charged op costs), communication (sum of bucket all-reduce durations) and
exposed communication (how long the compute lane waited for it).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import replace

import torch

from relay.device.backend.collective import group_of, run_collective
from relay.device.job import Job, die
from relay.kernels.cost import ITEMSIZE
from relay.kernels.replay import Replay, signature
from relay.kernels.throttle import ParameterTensors
from relay.trainer import Optimizer, TrainConfig, grad_params, make_buckets


class GradSync:
    """Buckets of gradients (parameters in reverse order, as backward produces them), each
    all-reduced and averaged on the communication lane, launched strictly in bucket order (so all
    devices issue the same collectives in the same order)."""

    def __init__(self, model, transport, system, algorithm: str, lane, compute_lane, elem_bytes: int,
                 bucket_bytes: float, threaded: bool, throttle, fabric, overlap: bool = True, replay=None):
        self.transport, self.system, self.algorithm, self.lane = transport, system, algorithm, lane
        self.group = group_of(system, fabric, range(system.devices), transport.rank)  # every device
        self.compute_lane = compute_lane
        self.elem_bytes, self.throttle = elem_bytes, throttle
        self.replay = replay  # a relay.kernels.replay.Replay: each gradient that becomes ready is a sync point
        params = grad_params(model)
        self.position = {p: k for k, p in enumerate(params)}
        self.buckets = make_buckets(params, elem_bytes, bucket_bytes)
        self.where = {p: i for i, b in enumerate(self.buckets) for p in b}
        self.threaded = threaded
        self.jobs = queue.Queue()
        self.error = None
        if threaded:
            threading.Thread(target=self._worker, daemon=True).start()
        # with overlap, each bucket leaves as soon as backward has produced it; without, finish()
        # sends them all once backward is over
        self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in params] if overlap else []
        self.reset()

    def reset(self) -> None:
        """Start a step."""
        self.waiting = [len(b) for b in self.buckets]
        self.launched = 0
        self.spans = []  # (start, end) of each bucket's all-reduce, emulated s
        self.ready = []  # when each bucket became ready on the compute lane, emulated s
        self.done = threading.Semaphore(0)

    def _ready(self, p) -> None:
        if self.replay is not None:
            self.replay.sync(self.position[p])
        i = self.where[p]
        self.waiting[i] -= 1
        while self.launched < len(self.buckets) and self.waiting[self.launched] == 0:
            self._launch(self.launched)
            self.launched += 1

    def _launch(self, i: int) -> None:
        with self.throttle.pause():  # flattening is communication bookkeeping, not model compute
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in self.buckets[i]]).cpu()  # gloo moves host memory
        ready = self.compute_lane.scheduled()  # the bucket is ready when backward got here
        self.ready.append(ready)
        if self.threaded:
            self.jobs.put((i, flat, ready))
        else:
            with self.throttle.pause():
                self._reduce(i, flat, ready)

    def _reduce(self, i: int, flat: torch.Tensor, ready: float) -> None:
        # the relay backend's code path (engine.py): one implementation of collectives on devices
        self.spans.append(run_collective(self.transport, self.group, "all_reduce", self.algorithm, flat, flat.numel(),
                                         self.lane, ready, elem_bytes=self.elem_bytes))
        flat /= self.system.devices
        at = 0
        for p in self.buckets[i]:
            n = p.numel()
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(flat[at:at + n].view_as(p))
            at += n
        self.done.release()

    def _worker(self) -> None:
        while True:
            i, flat, ready = self.jobs.get()
            try:
                self._reduce(i, flat, ready)
            except BaseException as e:  # surfaces in finish(), on the compute thread
                self.error = e
                self.done.release()

    def finish(self, timeout_s: float) -> float:
        """Launch what backward left (unused parameters get zero gradients), wait for every
        bucket; returns the emulated time the last one ended."""
        while self.launched < len(self.buckets):
            self._launch(self.launched)
            self.launched += 1
        for _ in self.buckets:
            if not self.done.acquire(timeout=timeout_s):
                raise RuntimeError(f"gradient all-reduce did not finish within {timeout_s:g} s")
            if self.error is not None:
                raise self.error
        return max((end for _, end in self.spans), default=0.0)


def train(dev, job: Job, config: TrainConfig) -> dict:
    """The training loop of one device. Returns per-step rows and, on rank 0, the final weights;
    each row is also reported as it is made (the driver polls them, so a failure keeps them)."""
    rank, transport, host = dev.index, dev.transport, dev.host
    dev.rows = []
    wl, world = config.workload, job.system.devices
    torch.manual_seed(config.seed)
    model = wl.build_model().to(host)
    _broadcast_weights(model, transport, world)
    opt = Optimizer(config.optimizer_used, model.parameters(), config.lr_used)
    if job.clock == "wall":  # emulated 0 comes once every device is set up, whatever that took
        job = replace(job, epoch=transport.agree(time.time() + 0.1 + 0.005 * world, world))
    compute, comm = job.lane(), job.lane()
    throttle = job.throttle(rank, compute, host)
    throttle.fixed = ParameterTensors(model.parameters())  # charged once under batch_scale
    elem = ITEMSIZE[job.dtype]  # gradients travel at the emulated dtype
    # charges recorded segments of a step once its ops repeat (kernels/replay.py)
    replay = Replay(throttle, enabled=config.replay)
    sync = GradSync(model, transport, job.system, config.algorithm, comm, compute, elem,
                    config.bucket_mb * 1e6, threaded=job.clock == "wall", throttle=throttle,
                    overlap=config.overlap, fabric=job.fabric(elem), replay=replay)
    data = _prefetch(wl.batches(rank, world, config.batch_for(world), config.seed), job.clock == "wall")
    rows = []
    compute.start()
    comm.start()
    for step in range(config.steps):
        if job.faults.fails_here(rank, step):
            die()
        batch = _to(next(data), host)
        r0, t0, c0, f0 = time.time(), compute.measure(), throttle.emulated_s, throttle.flops
        sync.reset()
        replay.begin((signature(batch), config.batch_scale))
        throttle.batch_scale = config.batch_scale  # forward and backward scale with the batch ...
        with replay.charged():
            loss = wl.loss(model, batch)
            loss.backward()
        throttle.batch_scale = 1.0  # ... the optimizer step does not
        replay.sync("backward")
        t_bwd = compute.now()
        comm_end = sync.finish(job.timeout_s)
        compute.advance_to(comm_end)
        t_opt = compute.scheduled()
        with replay.charged():
            opt.step()
            opt.zero_grad()
        replay.end()
        t1 = compute.measure()
        # the global batch's loss, known to every device (so a failed device's steps keep theirs)
        local = float(loss.detach())
        global_loss = transport.total([local], world)[0] / world if world > 1 else local
        rows.append({"step": step, "loss": global_loss, "local_loss": local, "start_s": t0, "end_s": t1,
                     "compute_s": throttle.emulated_s - c0, "comm_s": sum(b - a for a, b in sync.spans),
                     "exposed_comm_s": max(0.0, comm_end - t_bwd), "flops": throttle.flops - f0,
                     "wall_s": time.time() - r0, "ready_s": list(sync.ready), "charged": replay.mode,
                     "spans": {"forward+backward": (t0, t_bwd), "optimizer": (t_opt, t1),
                               "all-reduce": list(sync.spans)}})
        dev.report(rows[-1])
    for h in sync.hooks:
        h.remove()
    stats = [compute.stats(), comm.stats()]
    out = {"device": rank, "rows": rows, "fidelity": min(s["fidelity"] for s in stats),
           "overrun_s": sum(s["overrun_s"] for s in stats)}
    if rank == 0:
        out["state_dict"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return out


def _to(batch, device):
    if isinstance(batch, (tuple, list)):
        return type(batch)(t.to(device) for t in batch)
    return batch.to(device)


def _prefetch(it, threaded: bool, depth: int = 2):
    """Batches made ahead on a thread (as a DataLoader's workers would), so that making them
    is not charged to the wall clock's compute lane."""
    if not threaded:
        return it
    q = queue.Queue(depth)

    def fill():
        for b in it:
            q.put(b)

    threading.Thread(target=fill, daemon=True).start()
    return iter(q.get, None)


def _broadcast_weights(model, transport, world: int) -> None:
    """Rank 0's initial weights to every device (not part of any emulated step)."""
    flat = torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])
    transport.control("broadcast", flat, world)
    at = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[at:at + p.numel()].view_as(p))
            at += p.numel()
