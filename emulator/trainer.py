"""What a training run is, in one process: the training configuration (declared once, for the
Python API, the CLI, presets and config.json), the optimizer, gradient buckets, the memory
estimate, and `train_single`, the one-process reference that N-device training must equal.

The device side (emulator/device/training/loop.py) runs the loop on every device; the driver side
(emulator/driver/training.py) checks, launches and aggregates. Both read this module.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace

import torch
from torch.distributed.tensor import DTensor

from relay import workloads
from relay.collectives.schedules import check as check_algorithm
from relay.errors import ConfigError
from relay.kernels.cost import ITEMSIZE
from relay.parallel import Parallel
from relay.workloads import Workload, routing

TENSORS = ("real", "fake")
OPTIMIZER_BYTES = {"adamw": 12, "sgd": 4}  # per parameter: fp32 master weights (+ Adam's m and v)


def _option(default, doc: str):
    """A TrainConfig field: its default and its documentation, which the CLI's help reuses."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How one data-parallel training run trains. Every default lives here."""

    workload: Workload | str = _option(
        "gpt-tiny", "mlp, gpt-tiny, llama-debug, moe-debug (llama3-8b/70b/405b, deepseek-v3, mixtral-8x7b: fake "
        "tensors only), or package.module:attribute (a Workload or a function returning one)")
    steps: int = _option(10, "training steps per run")
    per_device_batch: int | None = _option(
        None, "samples each device computes per step (weak scaling); default 8, or global_batch / devices")
    global_batch: int | None = _option(
        None, "samples per step over all devices (strong scaling: divided over the devices)")
    batch_scale: int = _option(
        1, "charge each device for this many times the batch it computes (FLOPs and activation bytes)")
    algorithm: str = _option(
        "auto", "all-reduce algorithm for the gradients; auto: the vendor library's choice by size and system")
    seed: int = _option(0, "seed of the initial weights and of the data")
    overlap: bool = _option(True, "all-reduce each gradient bucket during backward (as DDP does)")
    lr: float | None = _option(None, "learning rate (default: the workload's)")
    optimizer: str | None = _option(None, "adamw or sgd (default: the workload's)")
    bucket_mb: float = _option(
        1.0, "gradient bucket, MB at the emulated dtype (DDP's 25 MB would leave a small model nothing "
        "to overlap)")
    warmup: int = _option(1, "steps left out of the summary means")
    replay: bool = _option(
        True, "once a step's ops repeat, run it at plain torch speed and charge its recorded segments (the same "
        "emulated times); off: charge every op as it runs, for a model whose ops change from step to step "
        "with Python state or data read through tolist() or numpy()")
    parallel: Parallel | None = _option(
        None, "parallelism plan through PyTorch's own APIs, e.g. dp=4,tp=2,pp=2,ep=2,microbatches=4,stages=2,ac=op "
        "with the bare words fsdp, recompute and sp (default: Relay's data-parallel trainer over every device); "
        "per_device_batch is then the batch of one data-parallel replica")
    tensors: str | None = _option(
        None, "real: tensors hold data and models train; fake: tensors carry shapes only (any model size; the "
        "same ops charged and the same messages, their data a stand-in; runs under a plan, by default dp over "
        "every device); default: the cluster's (real)")
    shared: bool | None = _option(
        None, "fake tensors: one worker per distinct role (a pipeline stage; with skewed routing, each expert "
        "group too) records its step, and every device is timed from its role's recording (the emulated times "
        "of one process per device); default: on above 16 devices")
    routing: object = _option(
        None, "fake tensors' mixture-of-experts routing: balanced (default), zipf:S (skewed, S the Zipf exponent) "
        "or a JSON file of token counts per expert (one list per MoE layer: a real run's)")

    DEFAULT_PER_DEVICE_BATCH = 8  # when neither per_device_batch nor global_batch is given

    def __post_init__(self):
        object.__setattr__(self, "workload", workloads.get(self.workload))
        for name in ("steps", "batch_scale"):
            _integer(name, getattr(self, name), 1)
        _integer("warmup", self.warmup, 0)
        for name in ("per_device_batch", "global_batch"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), 1)
        if self.per_device_batch is not None and self.global_batch is not None:
            raise ConfigError(f"per_device_batch = {self.per_device_batch} and global_batch = "
                             f"{self.global_batch}: give one (weak or strong scaling), not both")
        check_algorithm("all_reduce", self.algorithm, allow_auto=True)
        for name in ("overlap", "replay"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} = {getattr(self, name)!r} is invalid; give True or False")
        if self.lr is not None and not (_number(self.lr) and self.lr > 0):
            raise ConfigError(f"lr = {self.lr!r} is invalid; give a learning rate > 0")
        if self.optimizer not in (None, *OPTIMIZER_BYTES):
            raise ConfigError(f"optimizer = {self.optimizer!r} is unknown; choose 'adamw' or 'sgd'")
        if not (_number(self.bucket_mb) and self.bucket_mb > 0):
            raise ConfigError(f"bucket_mb = {self.bucket_mb!r} is invalid; give MB > 0")
        if self.shared is not None and not isinstance(self.shared, bool):
            raise ConfigError(f"shared = {self.shared!r} is invalid; give True, False or None (automatic)")
        if self.shared and self.tensors == "real":
            raise ConfigError("shared = True needs tensors = 'fake' (real tensors move real data between devices)")
        if self.tensors not in (None, *TENSORS):
            raise ConfigError(f"tensors = {self.tensors!r} is unknown; choose 'real' or 'fake'")
        try:
            object.__setattr__(self, "routing", routing.parse(self.routing))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.routing is not None and self.tensors == "real":
            raise ConfigError("routing applies to tensors = 'fake' (real tensors route by their data); drop it "
                              "or set tensors = 'fake'")
        if self.parallel is not None:
            object.__setattr__(self, "parallel", Parallel.parse(self.parallel))
            if self.batch_scale != 1:  # parameter-shaped tensors are recognised on whole, unsharded ones only
                raise ConfigError(f"batch_scale = {self.batch_scale} with parallel = '{self.parallel}' is not "
                                  "supported yet; use batch_scale = 1 with a plan, or drop parallel")
            if self.parallel.dist_opt:
                raise ConfigError(f"parallel = '{self.parallel}': dist_opt (the distributed optimizer) is modelled by "
                                  "`relay plan` only; runs shard optimizer state with fsdp: drop dist_opt or use fsdp")

    @classmethod
    def options(cls) -> list:
        """The fields a user sets (the CLI's training options, presets' keys)."""
        return [f for f in fields(cls) if f.name != "workload"]

    @classmethod
    def from_options(cls, values: dict, **overrides) -> TrainConfig:
        """From a mapping that may hold other keys and None for "not given" (parsed CLI options)."""
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in values.items() if k in names and v is not None}
        return cls(**{**given, **overrides})

    def batch_for(self, devices: int) -> int:
        """Samples each of `devices` devices computes per step."""
        if self.global_batch is None:
            return self.per_device_batch or self.DEFAULT_PER_DEVICE_BATCH
        if self.global_batch % devices:
            raise ConfigError(f"global_batch = {self.global_batch} does not divide over {devices} devices; "
                             "choose device counts that divide it, or weak scaling (per_device_batch)")
        return self.global_batch // devices

    def replicas(self, devices: int) -> int:
        """Data-parallel replicas among `devices`: each takes batch_for(replicas) samples a step."""
        return self.parallel.dp if self.parallel is not None else devices

    def global_samples(self, devices: int) -> int:
        """Samples a step computes over all devices (times batch_scale: as charged)."""
        n = self.replicas(devices)
        return n * self.batch_for(n) * self.batch_scale

    @property
    def fake(self) -> bool:
        return self.tensors == "fake"

    @property
    def weak(self) -> bool:
        return self.global_batch is None

    @property
    def lr_used(self) -> float:
        return self.lr or self.workload.lr

    @property
    def optimizer_used(self) -> str:
        return self.optimizer or self.workload.optimizer

    def replace(self, **changes) -> TrainConfig:
        return replace(self, **changes)

    def as_dict(self) -> dict:
        """For config.json: every field, the workload by name."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["workload"] = self.workload.name
        out["routing"] = None if self.routing is None else repr(self.routing)
        out["parallel"] = None if self.parallel is None else str(self.parallel)
        return out


def defaults() -> dict:
    """Field name -> default, for documentation and the CLI."""
    return {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(name: str, v, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"{name} = {v!r} is invalid; give an integer >= {low}")


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
            g = p.grad
            m, v = (self.m[i], self.v[i]) if self.m else (None, None)
            if isinstance(p, DTensor) and isinstance(g, DTensor) and g.placements == p.placements:
                # elementwise on one layout: DTensor would run each op on the local tensors; so do
                # we, without its dispatch (host time: thousands of parameters at full size)
                p, g = p._local_tensor, g._local_tensor
                if m is not None:
                    m, v = m._local_tensor, v._local_tensor
            if self.name == "sgd":
                p.add_(g, alpha=-self.lr)
                continue
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / (1 - b2 ** self.t) ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** self.t))

    def zero_grad(self) -> None:
        """Drop the gradients (torch's default, set_to_none): the next backward writes them
        afresh instead of adding into zeros (and GradSync fills any it leaves unset)."""
        for p in self.params:
            p.grad = None


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


def grad_params(model) -> list:
    """Parameters in the order backward produces their gradients (reverse of declaration)."""
    return [p for p in model.parameters() if p.requires_grad][::-1]


def bucket_sizes(config: TrainConfig, elem_bytes: int) -> list[int]:
    """Elements in each gradient bucket of the config's model, as the devices make them."""
    torch.manual_seed(0)
    buckets = make_buckets(grad_params(config.workload.build_model()), elem_bytes, config.bucket_mb * 1e6)
    return [sum(p.numel() for p in b) for b in buckets]


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


def check_host_fits(workload: Workload) -> None:
    """Refuses a model that real tensors would not fit on this host (counted on the meta device,
    which allocates nothing): fp32 weights, gradients and Adam's moments, 16 B a parameter, in
    every device process, must stay under half the host's free memory."""
    import psutil

    with torch.device("meta"):
        n = sum(p.numel() for p in workload.build_model().parameters())
    free = psutil.virtual_memory().available
    if 16 * n > free / 2:
        raise ValueError(f"workload = {workload.name!r} has {n / 1e9:.3g} billion parameters, {16 * n / 1e9:.3g} GB "
                         f"of real fp32 weights, gradients and Adam state per device; this host has "
                         f"{free / 1e9:.3g} GB free. Train its debug configuration (llama-debug, moe-debug), or cost "
                         "a full-size step on fake tensors (relay.device.fake.measure.step_cost)")


def memory_estimate(config: TrainConfig, per_device_batch: int, dtype: str = "bf16") -> dict:
    """Bytes one device needs: parameters and gradients at the emulated dtype, optimizer state
    (fp32 master weights, and Adam's two moments), and activations: the tensors autograd saves
    in one forward pass of a per-device batch (times batch_scale), floating ones counted at the
    emulated dtype."""
    size = ITEMSIZE[dtype]
    check_host_fits(config.workload)
    torch.manual_seed(0)
    model = config.workload.build_model()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    saved = {}

    def pack(t):
        saved[id(t)] = t.numel() * (size if t.is_floating_point() else t.element_size())
        return t

    batch = next(config.workload.batches(0, 1, per_device_batch, 0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        config.workload.loss(model, batch)
    out = {"parameters": n * size, "gradients": n * size,
           "optimizer": n * OPTIMIZER_BYTES[config.optimizer_used],
           "activations": sum(saved.values()) * config.batch_scale, "parameter_count": n}
    out["total"] = out["parameters"] + out["gradients"] + out["optimizer"] + out["activations"]
    return out
