"""Data-parallel training on the emulated devices.

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

import csv
import queue
import threading
import time
from dataclasses import dataclass, replace

import torch

from emulator.workloads import Workload
from kernels.cost import ITEMSIZE

BUCKET_MB = 1.0  # gradient bucket, MB at the emulated dtype (DDP's 25 MB would put a small model
#                   in one bucket, leaving nothing to overlap)
OPTIMIZER_BYTES = {"adamw": 12, "sgd": 4}  # per parameter: fp32 master weights (+ Adam's m and v)


class Optimizer:
    """AdamW (no weight decay) or plain SGD, as torch.optim computes them. Not torch.optim
    itself: its first step() imports torch._dynamo, 1-4 s in every device process."""

    def __init__(self, name: str, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.name, self.params, self.lr, self.betas, self.eps = name, list(params), lr, betas, eps
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params] if name == "adamw" else []
        self.v = [torch.zeros_like(p) for p in self.params] if name == "adamw" else []

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if self.name == "sgd":
                p.add_(p.grad, alpha=-self.lr)
                continue
            self.m[i].lerp_(p.grad, 1 - b1)
            self.v[i].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (self.v[i].sqrt() / (1 - b2 ** self.t) ** 0.5).add_(self.eps)
            p.addcdiv_(self.m[i], denom, value=-self.lr / (1 - b1 ** self.t))

    @torch.no_grad()
    def zero_grad(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()


# ---------------------------------------------------------------- gradient synchronisation
def make_buckets(params: list, elem_bytes: int, bucket_bytes: float) -> list[list]:
    """Consecutive parameters, up to bucket_bytes of gradient (at the emulated dtype) each."""
    buckets, size = [[]], 0
    for p in params:
        if buckets[-1] and size + p.numel() * elem_bytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel() * elem_bytes
    return buckets


def bucket_sizes(workload: Workload, bucket_mb: float | None, elem_bytes: int) -> list[int]:
    """Elements in each gradient bucket of `workload`'s model, as the trainer makes them."""
    torch.manual_seed(0)
    params = [p for p in workload.build_model().parameters() if p.requires_grad][::-1]
    buckets = make_buckets(params, elem_bytes, (bucket_mb or BUCKET_MB) * 1e6)
    return [sum(p.numel() for p in b) for b in buckets]


class GradSync:
    """Buckets of gradients (parameters in reverse order, as backward produces them), each
    all-reduced and averaged on the communication lane, launched strictly in bucket order (so all
    devices issue the same collectives in the same order)."""

    def __init__(self, model, transport, system, algorithm: str, lane, compute_lane, elem_bytes: int,
                 bucket_bytes: float, threaded: bool, throttle, link_of, overlap: bool = True):
        self.transport, self.system, self.algorithm, self.lane = transport, system, algorithm, lane
        self.link_of = link_of
        self.compute_lane = compute_lane
        self.elem_bytes, self.throttle = elem_bytes, throttle
        params = [p for p in model.parameters() if p.requires_grad][::-1]
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
        self.done = threading.Semaphore(0)

    def _ready(self, p) -> None:
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
        if self.threaded:
            self.jobs.put((i, flat, ready))
        else:
            with self.throttle.pause():
                self._reduce(i, flat, ready)

    def _reduce(self, i: int, flat: torch.Tensor, ready: float) -> None:
        # the relay backend's code path: one implementation of collectives on devices
        from emulator.backend.engine import group_of, run_collective
        world = group_of(self.system, self.link_of, range(self.system.devices), self.transport.rank)
        self.spans.append(run_collective(self.transport, world, "all_reduce", self.algorithm, flat, flat.numel(),
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


# ---------------------------------------------------------------- one device's training loop
@dataclass
class TrainSpec:
    workload: Workload
    steps: int
    per_device_batch: int
    algorithm: str = "ring"
    seed: int = 0
    overlap: bool = True
    lr: float | None = None
    optimizer: str | None = None
    bucket_mb: float = BUCKET_MB
    batch_scale: int = 1  # each device is charged for batch_scale x the batch it computes



def train_device(rank: int, job, spec: TrainSpec, transport, device: str = "cpu", on_step=None) -> dict:
    """The training loop of one device. Returns per-step rows and, on rank 0, the final weights."""
    wl, world = spec.workload, job.system.devices
    torch.manual_seed(spec.seed)
    model = wl.build_model().to(device)
    _broadcast_weights(model, transport, world)
    opt = Optimizer(spec.optimizer or wl.optimizer, model.parameters(), spec.lr or wl.lr)
    if job.clock == "wall":  # emulated 0 comes once every device is set up, whatever that took
        job = replace(job, epoch=transport.agree(time.time() + 0.1 + 0.005 * world, world))
    compute, comm = job.lane(), job.lane()
    throttle = job.throttle(rank, compute, device)
    elem = ITEMSIZE[job.dtype]  # gradients travel at the emulated dtype
    sync = GradSync(model, transport, job.system, spec.algorithm, comm, compute, elem,
                    spec.bucket_mb * 1e6, threaded=job.clock == "wall", throttle=throttle,
                    overlap=spec.overlap, link_of=job.links())
    data = _prefetch(wl.batches(rank, world, spec.per_device_batch, spec.seed), job.clock == "wall")
    rows = []
    compute.start()
    comm.start()
    for step in range(spec.steps):
        if job.faults.fails_here(rank, step):
            from emulator.device import die
            die()
        batch = _to(next(data), device)
        r0, t0, c0, f0 = time.time(), compute.measure(), throttle.emulated_s, throttle.flops
        sync.reset()
        throttle.work_scale = spec.batch_scale  # forward and backward scale with the batch ...
        with throttle:
            loss = wl.loss(model, batch)
            loss.backward()
        throttle.work_scale = 1.0  # ... the optimizer step does not
        t_bwd = compute.now()
        comm_end = sync.finish(job.timeout_s)
        compute.advance_to(comm_end)
        t_opt = compute.scheduled()
        with throttle:
            opt.step()
            opt.zero_grad()
        t1 = compute.measure()
        # the global batch's loss, known to every device (so a failed device's steps keep theirs)
        local = float(loss.detach())
        global_loss = transport.total([local], world)[0] / world if world > 1 else local
        rows.append({"step": step, "loss": global_loss, "local_loss": local, "start_s": t0, "end_s": t1,
                     "compute_s": throttle.emulated_s - c0, "comm_s": sum(b - a for a, b in sync.spans),
                     "exposed_comm_s": max(0.0, comm_end - t_bwd), "flops": throttle.flops - f0,
                     "wall_s": time.time() - r0,
                     "spans": {"forward+backward": (t0, t_bwd), "optimizer": (t_opt, t1),
                               "all-reduce": list(sync.spans)}})
        if on_step is not None:
            on_step(rows[-1])
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


# ---------------------------------------------------------------- the reference
def train_single(workload: Workload, steps: int, global_batch: int, seed: int = 0, lr=None,
                 optimizer=None) -> tuple[list[float], dict]:
    """Plain single-process training on the global batch: what N-device training must equal."""
    torch.manual_seed(seed)
    model = workload.build_model()
    opt = Optimizer(optimizer or workload.optimizer, model.parameters(), lr or workload.lr)
    data = workload.batches(0, 1, global_batch, seed)
    losses = []
    for _ in range(steps):
        loss = workload.loss(model, next(data))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- checks before any device runs
def memory_estimate(workload: Workload, per_device_batch: int, dtype: str = "bf16",
                    optimizer: str | None = None, batch_scale: int = 1) -> dict:
    """Bytes one device needs: parameters and gradients at the emulated dtype, optimizer state
    (fp32 master weights, and Adam's two moments), and activations: the tensors autograd saves
    in one forward pass of a per-device batch (times batch_scale), floating ones counted at the
    emulated dtype."""
    from kernels.cost import ITEMSIZE
    size = ITEMSIZE[dtype]
    torch.manual_seed(0)
    model = workload.build_model()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    saved = {}

    def pack(t):
        saved[id(t)] = t.numel() * (size if t.is_floating_point() else t.element_size())
        return t

    batch = next(workload.batches(0, 1, per_device_batch, 0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        workload.loss(model, batch)
    out = {"parameters": n * size, "gradients": n * size,
           "optimizer": n * OPTIMIZER_BYTES[optimizer or workload.optimizer],
           "activations": sum(saved.values()) * batch_scale, "parameter_count": n}
    out["total"] = out["parameters"] + out["gradients"] + out["optimizer"] + out["activations"]
    return out


def check_memory(workload: Workload, system, per_device_batch: int, dtype: str = "bf16",
                 optimizer: str | None = None, batch_scale: int = 1) -> dict:
    need = memory_estimate(workload, per_device_batch, dtype, optimizer, batch_scale)
    chip = min(set(system.chips), key=lambda c: c.hbm_bytes)  # the tightest device decides
    have = chip.hbm_bytes
    if need["total"] > have:
        gb = lambda b: f"{b / 1e9:.3g} GB"  # noqa: E731
        raise ValueError(
            f"memory: {workload.name} needs {gb(need['total'])} per device (parameters "
            f"{gb(need['parameters'])}, gradients {gb(need['gradients'])}, optimizer state "
            f"{gb(need['optimizer'])}, activations {gb(need['activations'])} at per_device_batch="
            f"{per_device_batch}{f' x batch_scale {batch_scale}' if batch_scale != 1 else ''}) but "
            f"{chip.name} has {gb(have)} of HBM; use a smaller per_device_batch or a chip with more memory")
    return need


def probe_ratio(workload: Workload, system, per_device_batch: int, dtype: str = "bf16",
                efficiency: dict | None = None, batch_scale: int = 1, steps: int = 2) -> float:
    """Real seconds per emulated second of compute for this workload on this host, from a few
    unthrottled steps in this process (the wall clock's dilation is chosen from it)."""
    from kernels.clock import VirtualLane
    from kernels.cost import CostModel
    from kernels.throttle import Throttle
    torch.manual_seed(0)
    model = workload.build_model()
    opt = Optimizer(workload.optimizer, model.parameters(), workload.lr)
    data = workload.batches(0, 1, per_device_batch, 0)
    lane = VirtualLane()
    best = float("inf")
    for _ in range(steps):
        batch = next(data)
        t0, e0 = time.perf_counter(), lane.t
        fastest = max(set(system.chips), key=lambda c: c.peak_flops(dtype))  # the tightest pacing
        with Throttle(CostModel(fastest, dtype, **(efficiency or {})), lane) as throttle:
            throttle.work_scale = batch_scale
            workload.loss(model, batch).backward()
            throttle.work_scale = 1.0
            opt.step()
            opt.zero_grad()
        best = min(best, (time.perf_counter() - t0) / (lane.t - e0))
    return best


# ---------------------------------------------------------------- the result
STEP_COLUMNS = ["step", "loss", "step_s", "compute_s", "comm_s", "exposed_comm_s", "other_s",
                "samples_per_s", "tokens_per_s", "mfu", "energy_j", "wall_s", "fidelity"]


class TrainResult:
    """Per-step metrics (emulated unless the name says wall), rank 0's final weights, a summary."""

    def __init__(self, steps: list[dict], state_dict: dict, config: dict, per_device: list[list[dict]]):
        self.steps = steps
        self.state_dict = state_dict
        self.config = config
        self.per_device = per_device  # each device's raw rows

    @property
    def losses(self) -> list[float]:
        return [s["loss"] for s in self.steps]

    def summary(self, skip: int = 1) -> dict:
        """Means over the steps after the first `skip` (warm-up), plus the final loss."""
        rows = self.steps[skip:] or self.steps
        def mean(k):
            return sum(r[k] for r in rows) / len(rows) if all(r[k] is not None for r in rows) else None
        out = {k: mean(k) for k in ("step_s", "compute_s", "comm_s", "exposed_comm_s", "other_s",
                                     "samples_per_s", "tokens_per_s", "mfu", "energy_j", "wall_s")}
        out["final_loss"] = self.steps[-1]["loss"]
        out["fidelity"] = min(r["fidelity"] for r in self.steps)
        out["energy_per_sample_j"] = out["energy_j"] / self.config["global_batch"] if out["energy_j"] else None
        tps = self.config.get("tokens_per_sample")
        out["energy_per_token_j"] = out["energy_per_sample_j"] / tps if tps and out["energy_per_sample_j"] else None
        return out

    def to_csv(self, path) -> None:
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=STEP_COLUMNS)
            w.writeheader()
            for r in self.steps:
                w.writerow({k: r[k] for k in STEP_COLUMNS})


def aggregate(per_device: list[dict], system, spec: TrainSpec, dtype: str, steps: int | None = None) -> list[dict]:
    """Global per-step rows from every device's rows. A step ends when its last device ends.
    After a failure some devices may lack their last rows: a step then uses the rows it has."""
    world = system.devices
    peak = system.peak(dtype)
    power = system.total_power_w
    samples = world * spec.per_device_batch * spec.batch_scale
    tps = spec.workload.tokens_per_sample
    rows_of = [d["rows"] for d in per_device]
    prev = max(r[0]["start_s"] for r in rows_of if r)
    out = []
    for k in range(spec.steps if steps is None else steps):
        rows = [r[k] for r in rows_of if len(r) > k]
        end = max(r["end_s"] for r in rows)
        step_s = end - prev
        prev = end
        mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        compute, exposed = mean("compute_s"), mean("exposed_comm_s")
        out.append({
            "step": k, "loss": rows[0]["loss"], "step_s": step_s, "compute_s": compute,
            "comm_s": mean("comm_s"), "exposed_comm_s": exposed, "other_s": max(0.0, step_s - compute - exposed),
            "samples_per_s": samples / step_s, "tokens_per_s": samples * tps / step_s if tps else None,
            "mfu": sum(r["flops"] for r in rows) * world / len(rows) / (step_s * peak),
            "energy_j": power * step_s if power else None,
            "wall_s": max(r["wall_s"] for r in rows), "fidelity": min(d.get("fidelity", 1.0) for d in per_device)})
    return out
