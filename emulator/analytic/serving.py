"""Serving a language model on a system: the emulated prefill and decode steps of one device under
a serving layout, TTFT, TPOT, throughput per device, and memory per device (weights + KV cache +
activations against the HBM).

Measured, as the plan search's footprint is (footprint.py): models of 0 and 1 block of each kind
(dense, MoE) run their prefill or one decode step (workloads/inference.py, against a KV cache of
the step's context) on fake tensors under the throttle, every aten op charged by the cost model;
a full model's step is base + blocks x (one block - base), exactly (measure.by_layers' method).
Fake tensors cost what real ones do, to the bit (tests/unit/test_serving.py holds a debug model's
figures on real and fake tensors equal).

The layout is the one large-scale MoE serving runs (DeepSeek's inference system, SGLang's
large-scale EP, CloudMatrix-Infer): attention data parallel over `dp` replicas of `tp` devices
(tp splits the heads and the dense SwiGLU, as Megatron does, and all-reduces their outputs),
experts spread over `ep` devices, ceil(n_experts / ep) each (one per device at large EP;
redundant copies beyond n_experts balance the load), each device's tokens dispatched to their
top-k experts and combined back by an all-to-all over the ep group, shared experts replicated on
every device. With balanced routing each device receives as many (token, expert) rows as it
sends: tokens x top_k, and messages only the peers those rows reach (dispatch.py: at batch 1 top_k - 1
peers, not all ep - 1). Communication times come from the collectives' closed forms on the system
(`collectives.predict`, the calibrated fabric). `overlap` (default on for MoE models: DeepSeek's
dual micro-batch overlap, SGLang's two-batch overlap, CloudMatrix-Infer's microbatch pipeline)
runs two micro-batches of half the sequences where that is faster than one batch, timed as the
devices run them (tbo.py), each half reading every weight and launching every kernel again, so
it pays where the all-to-all is long against the compute and not at decode where reading the
weights dominates (SGLang enables its two-batch overlap per deployment where it pays).

Figures: TTFT = one prefill step of `batch` prompts of `input_len` tokens on a replica (no
queueing); TPOT = one decode step of `batch` sequences at the mean context of the decode
(input_len + output_len / 2). Throughput per device: prefill batch x input_len / (tp x TTFT),
decode batch / (tp x TPOT). Units: seconds inside, ms and tokens/s where printed, bytes (GB =
1e9 bytes where printed).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
from dataclasses import dataclass, replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from relay import collectives
from relay.analytic import dispatch, tbo
from relay.analytic.footprint import split_heads
from relay.errors import ConfigError
from relay.hardware import chips
from relay.kernels import graphs as captured
from relay.kernels import moe_ops
from relay.kernels.clock import VirtualLane
from relay.kernels.cost import CostModel
from relay.kernels.throttle import Throttle
from relay.workloads import get as get_workload
from relay.workloads import inference
from relay.workloads.inference import EPShard

# bytes a weight is stored in (fp8: Linear GEMMs in FP8, kernels/fp8.py; int8: W8A8 at the INT8 peak, as
PRECISIONS = {"bf16": 2, "fp8": 1, "int8": 1}  # CloudMatrix-Infer serves DeepSeek-V3 on the 910C, arXiv 2506.12708)


@dataclass(frozen=True)
class Layout:
    """A serving layout: attention replicas x tensor parallel, experts over ep devices."""

    dp: int = 1  # attention data-parallel replicas (each serves its own requests)
    tp: int = 1  # devices per replica, splitting the heads and the dense SwiGLU
    ep: int = 1  # devices the routed experts are spread over (1: every device holds all)

    @property
    def devices(self) -> int:
        return self.dp * self.tp

    def __str__(self) -> str:
        return f"dp={self.dp},tp={self.tp},ep={self.ep}"

    @classmethod
    def parse(cls, text: str, devices: int) -> Layout:
        """'dp=8,tp=2,ep=16' (missing dp: devices / tp)."""
        fields = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            if key not in ("dp", "tp", "ep") or not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--parallel = {text!r}: {part!r} is not dp=N, tp=N or ep=N with N >= 1; "
                                  "write e.g. dp=320,tp=1,ep=320")
            fields[key] = int(value)
        fields.setdefault("dp", max(devices // fields.get("tp", 1), 1))
        return cls(**fields)


def check(layout: Layout, config, devices: int) -> None:
    """Refuses a layout the model or the system cannot run, naming the field, the value and a fix."""
    if layout.devices != devices:
        raise ConfigError(f"--parallel {layout}: dp x tp = {layout.devices} devices, but the system has {devices}; "
                          f"make dp x tp = {devices} (or --devices {layout.devices})")
    heads = [config.n_heads] + ([config.n_kv_heads] if getattr(config, "attention", "gqa") == "gqa" else [])
    if any(h % layout.tp for h in heads):
        raise ConfigError(f"--parallel tp={layout.tp}: the model's {'/'.join(map(str, heads))} heads do not "
                          "split evenly; choose a tp dividing them")
    if not hasattr(config, "n_experts") and layout.ep != 1:
        raise ConfigError(f"--parallel ep={layout.ep}: the model has no experts; use ep=1")
    if devices % layout.ep:
        raise ConfigError(f"--parallel ep={layout.ep} does not divide the {devices} devices; choose a divisor")


@dataclass(frozen=True)
class ServingCost(CostModel):
    """The cost model with weights stored as served: in "fp8" ("int8") a Linear GEMM reads FP8 (INT8)
    weights quantised once, ahead of serving (DeepSeek-V3's released FP8 checkpoint; CloudMatrix-Infer's
    W8A8), so none of training's per-step scaling and casts (kernels/fp8.py) is charged. Attention's
    own matmuls and the KV cache stay in BF16."""

    DTYPES = CostModel.DTYPES + ("int8",)

    def casts(self, func, args, fixed=None):
        return None

    def low_operands(self, func, args):
        """As the cost model's, and the experts' grouped GEMMs' weights: in "fp8" ("int8") they are read
        at 1 byte at the low precision's rate (SGLang's DeepGEMM grouped FP8 GEMMs, charged at the chip's
        cuBLAS fp8_matmul_eff; CloudMatrix-Infer's INT8 experts), as Linear GEMMs' operands are."""
        if func._overloadpacket is moe_ops.GROUPED_GEMMS_FORWARD:
            return list(args[1])
        return super().low_operands(func, args)


class _Largest(TorchDispatchMode):
    """The largest tensor an op makes (a floating one at `itemsize` bytes): the activations' high-water mark."""

    def __init__(self, itemsize: int):
        super().__init__()
        self.itemsize, self.bytes = itemsize, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and not func.is_view:
            size = self.itemsize if out.is_floating_point() else out.element_size()
            self.bytes = max(self.bytes, out.numel() * size)
        return out


@dataclass(frozen=True)
class Cost:
    """One device's step on the emulated chip (a part of the model, or all of it)."""

    seconds: float  # emulated compute seconds
    flops: float
    bytes: float  # bytes moved (HBM traffic, at the emulated dtype)
    params: int  # parameters this device holds
    largest: float  # bytes of the largest tensor made

    def __sub__(self, o):
        return Cost(self.seconds - o.seconds, self.flops - o.flops, self.bytes - o.bytes, self.params - o.params,
                    max(self.largest, o.largest))


def _model(workload: str, config, tp: int, local: int, n_layers: int, dense: int):
    family = importlib.import_module(type(config).__module__)
    extra = {"n_dense_layers": dense} if hasattr(config, "n_dense_layers") else {}
    model = split_heads(family.workload(workload, replace(config, n_layers=n_layers, ffn_dim=config.ffn_dim // tp,
                                                           **extra)).build_model(), tp)
    for block in model.blocks:
        if hasattr(block.ffn, "routing"):
            block.ffn = EPShard(config, local)
    return model


@functools.cache
def _measure(workload: str, config, tp: int, local: int, n_layers: int, dense: int, chip: str, dtype: str,
             batch: int, tokens: int, context: int, tensors: str = "fake", launch_us: float | None = None) -> Cost:
    """A model of n_layers blocks: one prefill of `tokens` (context = tokens), or one decode step
    (tokens 1, or 2: a token and its draft, both sampled) after `context - tokens` cached tokens,
    of `batch` sequences (launch_us: the cost
    model's override, a captured graph's: kernels/graphs.py)."""
    if tensors == "real":
        torch.manual_seed(0)
        model, mode = _model(workload, config, tp, local, n_layers, dense), None
    else:
        with torch.device("meta"):
            model = _model(workload, config, tp, local, n_layers, dense)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            model = model.to_empty(device="cpu")  # the rotary tables too: fake, of their shape (values unused)
    with mode or contextlib.nullcontext(), torch.no_grad():
        cache = inference.new_cache(model, batch, max(context, tokens))
        cache.length = context - tokens  # 0 for a prefill; a decode step's tokens (1, or 2 verifying a draft) come last
        idx = torch.zeros(batch, tokens, dtype=torch.long)
        largest = _Largest(2)  # (activations stay BF16 in fp8 and int8: only GEMM operands are one byte)
        throttle = Throttle(ServingCost(chips.get(chip), dtype, launch_us=launch_us), VirtualLane())
        with throttle, largest:
            inference.forward(model, idx, cache, sample=tokens if cache.length else 1)
    params = sum(p.numel() for p in model.parameters())
    return Cost(throttle.emulated_s, throttle.flops, throttle.bytes, params, largest.bytes)


def config_of(workload: str, context: int):
    """The workload's configuration with rotary tables long enough for `context` tokens."""
    c = get_workload(workload).config
    if c is None or not hasattr(c, "n_layers"):
        raise ConfigError(f"--workload {workload!r} is not a language model; choose llama3-8b, llama3-70b, "
                          "llama3-405b, deepseek-v3, mixtral-8x7b, llama-debug or moe-debug")
    return replace(c, seq_len=max(c.seq_len, context))


def step(workload: str, layout: Layout, chip: str, dtype: str, batch: int, tokens: int, context: int,
         tensors: str = "fake", graphs: bool = False) -> dict:
    """Per kind of part ("base", "dense", "moe"): one device's compute Cost of a prefill (tokens > 1)
    or decode step (graphs: run as a captured graph), and the count of each in the model."""
    c = config_of(workload, context)
    local = math.ceil(c.n_experts / layout.ep) if hasattr(c, "n_experts") else 0
    dense = getattr(c, "n_dense_layers", c.n_layers)
    args = (chip, dtype, batch, tokens, context, tensors, captured.launch_us(graphs))
    base = _measure(workload, c, layout.tp, local, 0, 0, *args)
    parts = {"base": (base, 1)}
    if dense:
        parts["dense"] = (_measure(workload, c, layout.tp, local, 1, 1, *args) - base, dense)
    if c.n_layers - dense:
        parts["moe"] = (_measure(workload, c, layout.tp, local, 1, 0, *args) - base, c.n_layers - dense)
    return parts


def communication(workload: str, layout: Layout, system, dtype: str, batch: int, tokens: int,
                  routing: str = "balanced") -> dict:
    """Emulated seconds per block of each kind: TP all-reduces and the expert dispatch and combine
    (each rank messaging only the peers its rows reach: dispatch.py)."""
    c = get_workload(workload).config
    act = batch * tokens * c.dim * 2  # bytes of a block's output on a replica (bf16)
    ar = collectives.predict("all_reduce", "auto", act, system.scaled(layout.tp)) if layout.tp > 1 else 0.0
    out = {"dense": 2 * ar, "moe": ar, "a2a": 0.0, "dispatch": 0.0, "combine": 0.0}
    if hasattr(c, "n_experts") and layout.ep > 1:
        # (token, expert) rows each device sends: its replica's tokens, as its EPShard computes them
        # (under tp > 1 every tp rank of a replica routes all of them: the MoE is not split by tp)
        rows = batch * tokens * c.top_k
        group = system.scaled(layout.ep)
        # DeepEP dispatches in FP8 where the run is FP8, W8A8 in INT8 (as its expert GEMMs read them; vllm-ascend
        # sends quantised tokens with their scales), and both combine in BF16
        out["dispatch"] = dispatch.seconds(rows, c.dim * PRECISIONS[dtype], group, routing)
        out["combine"] = dispatch.seconds(rows, c.dim * 2, group, routing)
        out["a2a"] = out["dispatch"] + out["combine"]
    return out


@dataclass(frozen=True)
class Phase:
    """One device's prefill or decode step."""

    seconds: float  # emulated step seconds
    compute_s: float  # emulated compute seconds
    tp_s: float  # TP all-reduces, emulated seconds
    a2a_s: float  # expert dispatch + combine, emulated seconds (before overlap)
    flops: float
    bytes: float  # HBM traffic
    params: int  # parameters on the device
    largest: float  # bytes of the largest tensor made
    micro: int = 1  # micro-batches: 2 overlap one's all-to-all with the other's compute
    graphs: bool = False  # run as a captured graph (kernels/graphs.py: decode, by default)


def _phase(workload: str, layout: Layout, system, dtype: str, batches: tuple, tokens: int, context: int,
           tensors: str, routing: str, graphs: bool = False) -> Phase:
    """The step of one batch (compute, then the all-to-all, plus TP all-reduces), or of two
    micro-batches overlapped as the devices run them (tbo.timeline: each reads every weight and
    launches every kernel; one's all-to-all hides behind the other's compute)."""
    runs = [(step(workload, layout, system.chip.name, dtype, b, tokens, context, tensors, graphs),
             communication(workload, layout, system, dtype, b, tokens, routing)) for b in batches]
    # embedding, final norm and head: once for the step's tokens (as the devices run them)
    base = step(workload, layout, system.chip.name, dtype, sum(batches), tokens, context, tensors, graphs)["base"][0]
    seconds = compute = tp = a2a = flops = nbytes = params = largest = 0.0
    for kind, (_, n) in runs[0][0].items():
        costs = [base] if kind == "base" else [parts[kind][0] for parts, _ in runs]
        c_s = sum(x.seconds for x in costs)
        link = sum(comm.get(kind, 0.0) for _, comm in runs)
        moe_a2a = sum(comm["a2a"] for _, comm in runs) if kind == "moe" else 0.0
        seconds += n * (c_s + moe_a2a + link)
        compute, tp, a2a = compute + n * c_s, tp + n * link, a2a + n * moe_a2a
        flops += n * sum(x.flops for x in costs)
        nbytes += n * sum(x.bytes for x in costs)
        params += n * costs[0].params
        largest = max([largest] + [x.largest for x in costs])
    if len(batches) == 2:
        c = config_of(workload, context)
        local, halves = math.ceil(c.n_experts / layout.ep), []
        for b, (parts, comm) in zip(batches, runs):
            pre, experts, post = tbo.stages(_model, ServingCost, workload, c, layout.tp, local, system.chip.name,
                                            dtype, b, tokens, context, captured.launch_us(graphs))
            dense = parts["dense"][0].seconds + comm["dense"] if "dense" in parts else 0.0
            halves.append(tbo.Half(dense, pre + comm["moe"], experts, post, comm["dispatch"], comm["combine"]))
        seconds = tbo.timeline(tuple(halves), runs[0][0].get("dense", (None, 0))[1], runs[0][0]["moe"][1],
                               base.seconds)
    return Phase(seconds, compute, tp, a2a, flops, nbytes, int(params), largest, len(batches), graphs)


def phase(workload: str, layout: Layout, system, dtype: str, batch: int, tokens: int, context: int,
          overlap: bool = True, tensors: str = "fake", routing: str = "balanced", graphs: bool = False) -> Phase:
    """One device's step: one batch (overlap off, a dense model, or a single sequence), or, with
    overlap, two micro-batches (halves of the sequences) where they are faster than one batch, as
    SGLang enables its two-batch overlap only where it pays."""
    one = _phase(workload, layout, system, dtype, (batch,), tokens, context, tensors, routing, graphs)
    if not overlap or batch < 2 or one.a2a_s == 0:
        return one
    two = _phase(workload, layout, system, dtype, (batch // 2, batch - batch // 2), tokens, context, tensors, routing,
                 graphs)
    return two if two.seconds < one.seconds else one


@dataclass(frozen=True)
class Serving:
    """What `relay serve` prints: one layout's emulated figures."""

    layout: Layout
    batch: int  # sequences per replica in a decode step
    prefill_batch: int  # prompts per replica in a prefill step
    prefill: Phase
    decode: Phase
    ttft_s: float
    tpot_s: float
    prefill_tps: float  # prompt tokens/s per device
    decode_tps: float  # output tokens/s per device
    memory: dict  # bytes per device: weights, kv_cache, activations, total, hbm
    mtp: float | None = None  # one multi-token prediction draft a decode step, accepted this often (mtp.py)

    @property
    def fits(self) -> bool:
        return self.memory["total"] <= self.memory["hbm"]


PREFILL_TOKENS = 16384  # prompt tokens per replica in a prefill step, by default (a chunked prefill's budget)


def serve(workload: str, system, layout: Layout, batch: int, input_len: int, output_len: int,
          dtype: str = "bf16", overlap: bool | None = None, tensors: str = "fake",
          prefill_batch: int | None = None, routing: str = "balanced", graphs: bool = True) -> Serving:
    """One layout's figures: decode `batch` sequences per replica, as a captured graph unless
    graphs is False (kernels/graphs.py; prefill runs eagerly, as serving systems run it); prefill
    `prefill_batch` prompts per replica per step (default: as many as fill PREFILL_TOKENS, at least one)."""
    c = config_of(workload, input_len + output_len)
    check(layout, c, system.devices)
    system.chip.peak_flops(dtype)  # refuses a precision the chip lacks
    overlap = hasattr(c, "n_experts") if overlap is None else overlap
    prefill_batch = prefill_batch or max(1, PREFILL_TOKENS // input_len)
    pre = phase(workload, layout, system, dtype, prefill_batch, input_len, input_len, overlap, tensors, routing)
    dec = phase(workload, layout, system, dtype, batch, 1, input_len + output_len // 2, overlap, tensors,
                routing, graphs)
    per_token = inference.cache_bytes_per_token(c) * c.n_layers
    if getattr(c, "attention", "gqa") == "gqa":
        per_token //= layout.tp  # the kv heads split tp ways; MLA's latent is whole on every tp rank
    # the cache of whichever phase holds more: the decode batch's whole sequences, or the prefill batch's prompts
    kv = max(batch * (input_len + output_len), prefill_batch * input_len) * per_token
    memory = {"weights": pre.params * PRECISIONS[dtype], "kv_cache": kv,
              "activations": 2 * max(pre.largest, dec.largest), "hbm": system.chip.hbm_gb * 1e9}
    memory["total"] = memory["weights"] + memory["kv_cache"] + memory["activations"]
    return Serving(layout, batch, prefill_batch, pre, dec, pre.seconds, dec.seconds,
                   prefill_batch * input_len / (layout.tp * pre.seconds),
                   batch / (layout.tp * dec.seconds), memory)
