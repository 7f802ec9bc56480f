"""One device's training step on fake tensors: the real model code at full size, on tensors that
carry shapes and no data (torch._subclasses.fake_tensor.FakeTensorMode).

The model is built on the meta device (no memory, no initialisation) and materialised as fake
tensors with `to_empty`. The throttle sits *above* the fake mode on the dispatch stack (entered
after it), so it sees every aten op first, runs it (the fake mode below computes only the output's
shape) and charges it by the cost model, which reads shapes and dtypes and nothing else: the
same op on a fake and a real tensor costs the same, to the bit.

Mixture-of-experts layers cannot route fake tokens, so a routing model (emulator/workloads/
routing.py) gives each expert's token count; on real tensors the real top-k decides and the
counts are recorded (`StepCost.routing`), which `routing.Histogram` replays.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from dataclasses import dataclass, replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_map

from relay.device.fake.blockops import BlockOps
from relay.errors import ConfigError
from relay.kernels.clock import VirtualLane
from relay.kernels.cost import ITEMSIZE, CostModel
from relay.kernels.throttle import Throttle
from relay.trainer import OPTIMIZER_BYTES, Optimizer
from relay.workloads import Workload
from relay.workloads import get as get_workload
from relay.workloads.routing import balanced

TENSORS = ("real", "fake")
# the torch dtype a block is measured in per emulated dtype (FP8 training keeps bf16 activations)
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
# how the plan model's blocks hold their tensors (measure_block): "emulated", as GPU trainers (the
# emulated dtype, fp32 upcasts charged at 4 bytes); "fp32", as Relay's own runs (every float charged
# at the emulated dtype): what a comparison with those runs measures
MODEL_DTYPES = ("emulated", "fp32")


@dataclass(frozen=True)
class StepCost:
    """What one training step of one device costs on the emulated chip."""

    seconds: float  # emulated compute seconds: forward, backward and optimizer step
    flops: float  # FLOPs charged (matmuls and attention; torch's FLOP formulas)
    bytes: float  # bytes charged (inputs plus outputs of every op, at the emulated dtype)
    ops: int  # aten ops charged
    forward_backward_s: float  # emulated seconds of the forward and backward passes alone
    forward_backward_flops: float
    routing: tuple  # per MoE layer, tokens per expert (empty for dense models)
    host_s: float  # real seconds this host took


def check_model_dtype(model_dtype) -> None:
    """A ConfigError naming an unknown model_dtype and the choices."""
    if model_dtype not in MODEL_DTYPES:
        raise ConfigError(f"model_dtype = {model_dtype!r} is unknown; choose 'emulated' (the blocks in the emulated "
                          "dtype, as GPU trainers hold them) or 'fp32' (as Relay's runs hold them)")


def _check_tensors(tensors: str) -> None:
    if tensors not in TENSORS:
        raise ValueError(f"tensors = {tensors!r} is unknown; choose 'real' or 'fake'")


def _moe_layers(model) -> list:
    return [m for m in model.modules() if hasattr(m, "routing") and hasattr(m, "counts")]


def _model_and_batch(wl: Workload, per_device_batch: int, tensors: str, seed: int, routing, dtype=None):
    """(model, batch, fake mode or None). The fake mode must stay active while they are used.
    dtype: the fake model's parameters in that torch dtype (default: the workload's, fp32)."""
    _check_tensors(tensors)
    batch = next(wl.batches(0, 1, per_device_batch, seed))  # token ids: small, made for real
    if tensors == "real":
        if routing is not None:
            raise ValueError("routing = a routing model applies to tensors = 'fake'; real tensors route "
                             "by their real top-k (leave routing None)")
        torch.manual_seed(seed)
        return wl.build_model(), batch, None
    with torch.device("meta"), _default_dtype(dtype):  # shapes only: no memory, no initialisation
        model = wl.build_model()
    # the meta parameters are inputs of to_empty's empty_like: the mode must take them
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = model.to_empty(device="cpu")
    # (a floating input in the model's dtype, as a low-precision trainer feeds it; token ids unchanged)
    batch = tree_map(lambda t: mode.from_tensor(t.to(dtype) if dtype and t.is_floating_point() else t)
                     if isinstance(t, torch.Tensor) else t, batch)
    for layer in _moe_layers(model):
        layer.routing = routing or balanced()
    return model, batch, mode


@contextlib.contextmanager
def _default_dtype(dtype):
    """torch's default floating dtype set to `dtype` inside (None: left as it is)."""
    was = torch.get_default_dtype()
    torch.set_default_dtype(dtype or was)
    try:
        yield
    finally:
        torch.set_default_dtype(was)


def step_cost(workload, per_device_batch: int, chip, *, tensors: str = "fake", routing=None,
              dtype: str = "bf16", optimizer: str | None = None, optimizer_step: bool = True, seed: int = 0,
              **efficiency) -> StepCost:
    """Emulated compute time, FLOPs and bytes of one training step (forward, backward, optimizer
    step) of `workload` on one `chip` (a catalog Chip) at `per_device_batch` samples.

    tensors: "fake" runs the model at any size on fake tensors; "real" runs it for real (the
    reference fake mode must equal). routing: a routing model for MoE layers on fake tensors
    (default balanced). optimizer_step=False leaves the optimizer step out."""
    wl = get_workload(workload)
    start = time.perf_counter()
    model, batch, mode = _model_and_batch(wl, per_device_batch, tensors, seed, routing)
    throttle = Throttle(CostModel(chip, dtype, **efficiency), VirtualLane())
    with mode or contextlib.nullcontext():
        opt = Optimizer(optimizer or wl.optimizer, model.parameters(), wl.lr)
        with throttle:
            wl.loss(model, batch).backward()
            fb_s, fb_flops = throttle.emulated_s, throttle.flops
            if optimizer_step:
                opt.step()
    return StepCost(throttle.emulated_s, throttle.flops, throttle.bytes, throttle.ops, fb_s, fb_flops,
                    tuple(tuple(m.counts) for m in _moe_layers(model)), time.perf_counter() - start)


def memory(workload, per_device_batch: int, *, dtype: str = "bf16", optimizer: str | None = None,
           routing=None) -> dict:
    """Bytes one device holds for a step, without sharding: parameters and gradients at the
    emulated dtype, optimizer state (fp32 master weights, and Adam's two moments), and
    activations: what autograd saves in the forward pass (found on fake tensors, so at any size),
    each storage counted once, floating ones at the emulated dtype, parameters left out. The model
    is built in the emulated dtype, as measure_block builds it (what its fp32 upcasts save)."""
    wl = get_workload(workload)
    model, batch, mode = _model_and_batch(wl, per_device_batch, "fake", 0, routing, TORCH_DTYPES.get(dtype))
    size = ITEMSIZE[dtype]
    held = {StorageWeakRef(t.untyped_storage()) for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        key = StorageWeakRef(t.untyped_storage())
        if key not in held:
            nbytes = t.untyped_storage().nbytes() // t.element_size() * (size if t.is_floating_point()
                                                                          else t.element_size())
            saved[key] = nbytes
        return t

    with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        wl.loss(model, batch)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {"parameters": n * size, "gradients": n * size,
           "optimizer": n * OPTIMIZER_BYTES[optimizer or wl.optimizer],
           "activations": sum(saved.values()), "parameter_count": n}
    out["total"] = out["parameters"] + out["gradients"] + out["optimizer"] + out["activations"]
    return out


def by_layers(workload, measure) -> dict:
    """measure(workload) of a full-size model, from models of at most one block: blocks of a kind
    are identical, so every additive figure (FLOPs, bytes, emulated seconds, parameters,
    activations) of the full model is base + blocks x (one block - base), exactly, where base is
    the model without blocks (embedding, final norm, output head, loss). For workloads whose
    `config` has n_layers (and, for MoE, n_dense_layers); measure returns a StepCost or a dict."""
    wl = get_workload(workload)
    c = wl.config
    if not hasattr(c, "n_layers"):
        return _numbers(measure(wl))
    family = importlib.import_module(type(c).__module__)  # the module whose workload() builds c

    def at(dense: int, moe: int) -> dict:
        extra = {"n_dense_layers": dense} if hasattr(c, "n_dense_layers") else {}
        return _numbers(measure(family.workload(wl.name, replace(c, n_layers=dense + moe, **extra))))

    dense = getattr(c, "n_dense_layers", c.n_layers)
    total = base = at(0, 0)
    for n, block in ((dense, (1, 0)), (c.n_layers - dense, (0, 1))):
        if n:
            one = at(*block)
            total = {k: total[k] + n * (one[k] - base[k]) for k in total}
    return total


def _numbers(x) -> dict:
    d = x if isinstance(x, dict) else {f: getattr(x, f) for f in
                                        ("seconds", "flops", "bytes", "ops", "forward_backward_s",
                                         "forward_backward_flops")}
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}


@dataclass(frozen=True)
class Block:
    """One training step of a (fake) model at `micro_batch` samples on one device: what the analytic
    model's memory footprint (analytic/footprint.py) measures its blocks with."""

    forward_s: float  # emulated seconds of the forward pass
    backward_s: float  # emulated seconds of the backward pass
    optimizer_s: float  # emulated seconds of the optimizer step
    activations: float  # bytes autograd saves in the forward pass, at the emulated dtype
    params: int  # parameters
    expert_params: int  # of which experts'
    ac_saved_s: float = 0.0  # forward seconds of the ops selective op checkpointing keeps (blockops.py)
    ac_saved_bytes: float = 0.0  # bytes of their outputs, at the emulated dtype
    norm_bytes: float = 0.0  # of `activations`, bytes autograd saves inside the blocks' norms
    weight_cast_s: float = 0.0  # of forward_s + backward_s, the FP8 weight casts a fused run caches (fusion.py)


def measure_block(wl: Workload, micro_batch: int, chip, dtype: str, optimizer: str, fusion: str = "eager",
                  attention: str = "sdpa", model_dtype: str = "emulated") -> Block:
    """Block figures of `wl` (built whole on fake tensors) at `micro_batch` samples on `chip`,
    its kernels charged as `fusion` runs them (kernels/fusion.py), its attention as `attention`'s
    kernels (kernels/attention.py). model_dtype "emulated": the model is built in the emulated dtype
    and its tensors charged at their own sizes (CostModel.real_sizes), so what it computes in fp32
    as GPU trainers do (the norms, the rotary embedding, the loss) moves fp32 bytes; "fp32": built
    in fp32, every float charged at the emulated dtype, as Relay's runs hold it. What autograd
    saves is counted at the emulated dtype (measure.memory's rule: an fp32 tensor it saves, as the
    norms' upcast input or the loss's fp32 log-softmax, at 2 bytes, an undercount)."""
    check_model_dtype(model_dtype)
    emulated = model_dtype == "emulated"
    built = TORCH_DTYPES.get(dtype) if emulated else None
    model, batch, mode = _model_and_batch(wl, micro_batch, "fake", 0, None, built)
    size = ITEMSIZE[dtype]
    held = {StorageWeakRef(t.untyped_storage()) for t in [*model.parameters(), *model.buffers()]}
    saved, norms = {}, {}

    def pack(t):  # memory()'s rule: each storage once, floating ones at the emulated dtype
        key = StorageWeakRef(t.untyped_storage())
        if key not in held and key not in saved:
            saved[key] = t.untyped_storage().nbytes() // t.element_size() * (
                size if t.is_floating_point() else t.element_size())
            if ops.norm:
                norms[key] = saved[key]
        return t

    throttle = Throttle(CostModel(chip, dtype, fusion=fusion, attention=attention, real_sizes=emulated), VirtualLane())
    ops = BlockOps(throttle, size)
    if throttle.fuser is not None:  # the parameters, whose FP8 casts Transformer Engine caches (kernels/fusion.py)
        throttle.fuser.weights = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}
    ops.attach(model)
    with mode:
        opt = Optimizer(optimizer, model.parameters(), wl.lr)
        with throttle:
            with ops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = wl.loss(model, batch)
            forward_s = throttle.emulated_s
            loss.backward()
            backward_s = throttle.emulated_s - forward_s
            opt.step()
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return Block(forward_s, backward_s, throttle.emulated_s - forward_s - backward_s, sum(saved.values()),
                sum(p.numel() for p in model.parameters()), experts, ops.saved_s, ops.saved_bytes,
                sum(norms.values()), throttle.cost_model.cast_seconds(*throttle.fuser.weight_casts)
                if throttle.fuser is not None else 0.0)
