"""Per-op cost model: what one aten op would cost on the emulated chip (a roofline).

    seconds = launch_s + max(flops / (peak[dtype] * matmul_eff * q), bytes / (hbm_Bps * mem_eff))

q is 1 except for GEMMs (mm, addmm, bmm, baddbmm, the experts' grouped ones), where it is the tile
and wave quantisation of the output's shape on the chip (kernels/gemm.py): small and skinny GEMMs
reach less of the peak; lowered where needed so that no GEMM runs, launch included, faster than
the chip's fastest measured one at its precision (`chip.gemm_cap`, `CostModel._capped`); and for
fused attention backward kernels, whose recompute of the scores it stands for.

FLOPs (the model's) come from PyTorch's own formulas (torch.utils.flop_counter's registry:
matmuls, convolutions, attention), completed below for the attention kernels the registry lacks
(the CPU flash kernel among them), less the score matrix a fused attention backward recomputes
(the kernel's work, not the model's: charged as time, see FUSED_BACKWARD); every other op has
none and is memory-bound. Bytes are the op's inputs plus outputs, floating tensors counted at
the *emulated* dtype (bf16 by default, whatever the host computes in; with `real_sizes`, a run
already in the emulated dtype, at their own), integer and bool tensors at their real size. Views
and bare allocations launch no kernel: they cost 0.

The chip is any object with the catalog's SI views (`peak_flops(dtype)`, `hbm_Bps`), the
default `matmul_eff`, `mem_eff`, `launch_us` and `compute_units`, and `gemm_cap(fp8)`: an
`relay.hardware.chips.Chip`. This layer sits below the rest of Relay and imports none of it;
its bad-input errors are ValueErrors that the driver checks before any device starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from relay.kernels import attention, fp8, fusion, moe_ops
from relay.kernels.gemm import quantisation

# bytes of a floating element as stored: an "fp8" run stores BF16 and casts to FP8 only for the
# GEMMs of Linear layers (kernels/fp8.py, torchao's float8 training)
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp8": 2, "int8": 2}
# dtypes whose Linear GEMMs run at a low precision, operands at 1 byte: fp8 (torchao's float8 training,
# kernels/fp8.py), int8 (W8A8 serving, as CloudMatrix-Infer serves; analytic/serving.py)
LOW_GEMMS = (fp8.PRECISION, "int8")
# allocations that write nothing (their bytes are written by the op that fills them)
_FREE = {torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided,
         torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided,
         # metadata queries, which fake tensors answer through the dispatcher: no kernel runs
         torch.ops.prim.device, torch.ops.prim.layout, torch.ops.aten.sym_size, torch.ops.aten.sym_stride,
         torch.ops.aten.sym_numel, torch.ops.aten.sym_storage_offset,
         # profiler markers (record_function, which FSDP2's hooks open and close): no kernel
         torch.ops.profiler._record_function_enter_new, torch.ops.profiler._record_function_exit}
# Functional collectives (DTensor's, the expert all-to-all) whose GPU kernel is the collective
# itself, on the communication stream (charged there, by the engine): their output is allocated
# empty, and waiting for one (wait_tensor) is a stream wait, no kernel. (all_reduce and broadcast
# clone their input on the current stream first, torch/csrc/distributed/c10d/Functional.cpp:
# charged, as a copy.)
_FREE_COLLECTIVES = {"all_gather_into_tensor", "all_gather_into_tensor_coalesced", "reduce_scatter_tensor",
                     "reduce_scatter_tensor_coalesced", "all_to_all_single", "wait_tensor", "_wrap_tensor_autograd"}


def _free(packet) -> bool:
    return packet in _FREE or (packet._qualified_op_name.split("::")[0] == "_c10d_functional"
                               and packet._qualified_op_name.split("::")[1] in _FREE_COLLECTIVES)


@dataclass(frozen=True)
class OpCost:
    seconds: float  # emulated seconds
    flops: float
    bytes: float  # floats at the emulated dtype (CostModel.real_sizes: at their own)


_ZERO = OpCost(0.0, 0.0, 0.0)
# (a grouped GEMM: one GEMM of all its groups' rows, kernels/moe_ops.py; _scaled_mm: an FP8 GEMM, kernels/fp8.py)
_GEMMS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm,
          torch.ops.aten._scaled_mm, *moe_ops.GROUPED_GEMMS}
_ADDS = {torch.ops.aten.addmm, torch.ops.aten.baddbmm}  # (input, a, b): the reduction is a's last dim
_KIND: dict = {}  # op -> 0 (free), 1 (memory-bound) or its FLOP formula
_FLOPS: dict = {}  # (op, shapes and other arguments) -> FLOPs: shapes repeat from step to step,
#                    and PyTorch's formulas (with their tree_maps) cost more than the lookup
_FLOPS_MAX = 100_000  # distinct entries kept at most (inputs whose shapes never repeat)


# Attention kernels that torch.utils.flop_counter has no formula for, with torch's own counts
# (sdpa_flop_count: QK^T and PV; the backward adds the recomputed QK^T and three more matmuls,
# of which the model's FLOPs keep the four: see FUSED_BACKWARD).
# Like torch's formulas they count the full score matrix also when is_causal; the time of a causal
# kernel halves it on a chip with an attention table (kernels/attention.py), elsewhere it is charged
# what an explicitly masked matmul would be. The math
# fallback (aten._scaled_dot_product_attention_math) decomposes into matmuls and softmax, which
# are charged op by op. Formulas take raw tensors and `out_val`, as the registry's do.
def _sdpa_forward(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _sdpa_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def _flash_forward_into(out, query, key, value, *args, out_val=None, **kwargs) -> int:
    # _flash_attention_forward writing into `out`: the registry's formula of the plain kernel
    return flop_registry[torch.ops.aten._flash_attention_forward](query, key, value, *args, out_val=None)


_aten = torch.ops.aten
ATTENTION_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
    _aten._scaled_dot_product_fused_attention_overrideable: _sdpa_forward,
    _aten._scaled_dot_product_fused_attention_overrideable_backward: _sdpa_backward,
    _aten._scaled_dot_product_attention_math_for_mps: _sdpa_forward,
    _aten._flash_attention_forward_no_dropout_inplace: _flash_forward_into,
}


# Fused attention backward kernels recompute the score matrix QK^T (they keep none from the
# forward), and torch's formulas count it: 2 s_q s_k (3 d_q + 2 d_v) per head, where attention
# written out with matmuls, which keeps its scores, does 2 s_q s_k (2 d_q + 2 d_v). The recompute
# is the kernel's work, not the model's: its model FLOPs leave it out, and its time keeps it, as
# a rate of (2 d_q + 2 d_v) / (3 d_q + 2 d_v) of the peak in model FLOPs (the q of op_parts).
FUSED_BACKWARD = {
    _aten._scaled_dot_product_flash_attention_for_cpu_backward,
    _aten._scaled_dot_product_fused_attention_overrideable_backward,
    _aten._scaled_dot_product_efficient_attention_backward,
    _aten._scaled_dot_product_flash_attention_backward,
    _aten._scaled_dot_product_cudnn_attention_backward,
    _aten._flash_attention_backward,
    _aten._efficient_attention_backward,
}


def _without_recompute(executed_flops, args) -> tuple[int, float]:
    """(Model FLOPs, q) of a fused attention backward (args: grad_out, query, key, value, ...;
    the head size is the last dimension in every layout)."""
    d_q, d_v = args[1].shape[-1], args[3].shape[-1]
    model = executed_flops // (3 * d_q + 2 * d_v) * (2 * d_q + 2 * d_v)
    return model, (2 * d_q + 2 * d_v) / (3 * d_q + 2 * d_v)


def _signature(x):
    """What a FLOP formula can see of an argument: a tensor's shape (and dtype), anything else."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape), x.dtype
    if isinstance(x, (list, tuple)):
        return tuple(_signature(y) for y in x)
    return x


@dataclass(frozen=True)
class CostModel:
    chip: object  # a relay.hardware.chips.Chip (or anything with its SI views and gemm_cap)
    dtype: str = "bf16"  # emulated dtype of floating tensors
    matmul_eff: float | None = None  # None: the chip's default
    mem_eff: float | None = None
    launch_us: float | None = None
    fusion: str = "eager"  # "eager": a kernel per aten op; "fused": chains fused (kernels/fusion.py)
    attention: str = attention.DEFAULT  # the fused attention kernels' implementation (kernels/attention.py)
    # floating tensors at their own itemsize: the run already holds its tensors in the emulated dtype,
    # so what it upcasts (norms, rotary, loss in fp32, as trainers do) moves fp32 bytes; otherwise
    # every floating tensor at the emulated dtype's (a model run in fp32 for the emulated bf16)
    real_sizes: bool = False
    DTYPES = ("bf16", "fp16", "fp8")  # what trains; int8 only serves (analytic/serving.py's ServingCost)

    def __post_init__(self):
        fusion.check(self.fusion)
        attention.check(self.attention)
        if self.dtype not in self.DTYPES:
            serving = " (int8 is a serving precision: relay serve --precision int8)" if self.dtype in ITEMSIZE else ""
            raise ValueError(f"dtype = {self.dtype!r} is not an emulated dtype here{serving}; "
                             f"choose one of {', '.join(self.DTYPES)}")
        for f, lo in (("matmul_eff", 0), ("mem_eff", 0), ("launch_us", -1e-300)):
            v = getattr(self, f)
            if v is None:
                object.__setattr__(self, f, getattr(self.chip, f))
            elif not isinstance(v, (int, float)) or not v > lo or (f != "launch_us" and v > 1):
                rng = "a fraction in (0, 1]" if f != "launch_us" else "a number >= 0"
                raise ValueError(f"{f} = {v!r} is invalid; give {rng}")
        # resolved once: the hot path below only multiplies
        low = self.dtype in LOW_GEMMS  # (the attribute keeps fp8's name: Linear GEMMs at the low precision)
        object.__setattr__(self, "fp8", low)
        object.__setattr__(self, "_flop_rate", self.chip.peak_flops("bf16" if low else self.dtype) * self.matmul_eff)
        object.__setattr__(self, "_fp8_speedup", self._low_rate(self.dtype) if low else None)
        object.__setattr__(self, "_byte_rate", self.chip.hbm_Bps * self.mem_eff)
        object.__setattr__(self, "_launch_s", self.launch_us / 1e6)
        object.__setattr__(self, "_float_size", ITEMSIZE[self.dtype])
        object.__setattr__(self, "_gemm_cap", (self.chip.gemm_cap(), self.chip.gemm_cap(fp8=True)))

    def tensor_bytes(self, t: torch.Tensor) -> int:
        return t.numel() * self.itemsize(t)

    def itemsize(self, t: torch.Tensor) -> int:
        """Bytes per element the cost model charges `t` (float8: 1 byte, kernels/fp8.py)."""
        if self.real_sizes or not t.is_floating_point() or t.dtype in fp8.BYTE_FLOATS:
            return t.element_size()
        return self._float_size

    def seconds(self, flops: float, nbytes: float, launches: int = 1) -> float:
        return launches * self._launch_s + max(flops / self._flop_rate, nbytes / self._byte_rate)

    def op_cost(self, func, args=(), kwargs=None, out=None) -> OpCost:
        """Cost of one executed aten op (func is an OpOverload, out its result)."""
        parts = self.op_parts(func, args, kwargs, out)
        if parts is None:
            return _ZERO
        flops, nbytes, _, q = parts
        seconds = self.seconds(flops / q, nbytes)
        casts = self.casts(func, args)
        if casts:
            seconds += self.cast_seconds(casts[0], casts[1])
            nbytes += casts[1]
        return OpCost(seconds, float(flops), float(nbytes))

    def op_parts(self, func, args=(), kwargs=None, out=None, fixed=None, scale: float = 1.0) -> tuple | None:
        """(FLOPs, bytes, fixed bytes, q) of one executed aten op, or None for an op that launches
        no kernel. `bytes` counts every tensor read or written; `fixed bytes`, the part of it in
        tensors for which fixed(tensor) is true (the parameter- and gradient-shaped ones, whose
        size does not grow with the batch); q, a GEMM's quantisation (1 for other ops) for its
        output as it would be with `scale` times the batch (rows, or the batch of a bmm, grow;
        a parameter-shaped output does not). This runs for every op a device executes, so it
        walks arguments by hand rather than with pytree."""
        kind = _KIND.get(func)
        if kind is None:
            packet = func._overloadpacket
            kind = _KIND[func] = 0 if func.is_view or _free(packet) else \
                ATTENTION_FLOPS.get(packet) or moe_ops.FLOPS.get(packet) or flop_registry.get(packet, 1)
        if kind == 0:
            return None
        flops, q, low, gemm, scaled = 0, 1.0, None, False, False
        if kind != 1:  # a FLOP formula, computed once per distinct signature
            flops = _memo_flops(func, kind, args, kwargs, out)
            if func._overloadpacket in FUSED_BACKWARD:
                flops, q = _without_recompute(flops, args)
            if func._overloadpacket in attention.FORWARD or func._overloadpacket in attention.BACKWARD:
                # the implementation's own efficiency and causal skipping, where the chip has them
                r = attention.rate(self.chip, self.attention, func._overloadpacket in attention.BACKWARD,
                                   attention.causal(func, args, kwargs))
                q *= r / self.chip.matmul_eff if r else 1.0
            gemm = func._overloadpacket in _GEMMS and isinstance(out, torch.Tensor) and out.dim() >= 2
            if gemm:
                *batch, m, n = out.shape
                a = args[1] if func._overloadpacket in _ADDS else args[0]
                k = a.shape[-1] if isinstance(a, torch.Tensor) else None
                if fixed is not None and fixed(out):  # a weight gradient: its reduction grows
                    q = quantisation(m, n, self.chip.compute_units, int(math.prod(batch)),
                                     int(k * scale) if k else None)
                elif batch:
                    q = quantisation(m, n, self.chip.compute_units, int(math.prod(batch) * scale), k)
                else:
                    q = quantisation(int(m * scale), n, self.chip.compute_units, 1, k)
            elif func._overloadpacket is moe_ops.GROUPED_DW and out:  # per group a weight gradient
                gemm, rows = True, int(args[0].shape[0] * scale / len(out))
                q = quantisation(out[0].shape[0], out[0].shape[1], self.chip.compute_units, len(out), rows or 1)
            low = self.low_operands(func, args) if self.fp8 else None
            if not low and fp8.scaled(func, args):  # a program's own FP8 GEMM (its operands are float8 already)
                q, scaled = q * self._scaled_mm_speedup(), True
        nbytes, fixed_bytes = self._bytes((args, out, tuple(kwargs.values()) if kwargs else ()), fixed)
        if low:  # a Linear GEMM in FP8: its rate (folded into q) and its operands at 1 byte
            q *= self._fp8_speedup
            for t in low:
                saved = t.numel() * (self.itemsize(t) - fp8.OPERAND_BYTES)
                nbytes -= saved
                fixed_bytes -= saved if fixed is not None and fixed(t) else 0
        if gemm and not (low and self.dtype != fp8.PRECISION):  # (no INT8 GEMM was measured: INT8 is not capped)
            q = self._capped(q, flops * scale, bool(low) or scaled)
        return flops, nbytes, fixed_bytes, q

    def low_operands(self, func, args) -> list | tuple | None:
        """The operands a GEMM reads at one byte at the low precision (its rate, kernels/fp8.py), or
        None: a Linear GEMM's two."""
        return fp8.operands(func, args) if func._overloadpacket in fp8.GEMMS else None

    def _capped(self, q: float, flops: float, fp8_rate: bool) -> float:
        """A GEMM's q lowered, where needed, so that it runs, its launch included, no faster than
        the fastest GEMM measured at its precision (the chip's MAMF: chips.Chip.gemm_cap); the
        measured best shape itself is unchanged (its efficiency was set from it, launch included)."""
        cap = self._gemm_cap[fp8_rate]
        if cap >= 1 or not flops:
            return q
        speedup = self._scaled_mm_speedup() if fp8_rate else 1.0  # (the "fp8" recipe's rate, or a program's)
        # launch + flops / (rate q) >= flops / (cap rate), rate = _flop_rate x speedup, q with the speedup in it
        over = 1 / cap - self._launch_s * self._flop_rate * speedup / flops
        return min(q, speedup / over) if over > 0 else q

    def _low_rate(self, dtype: str) -> float:
        """A low-precision GEMM's rate over _flop_rate: the chip's FP8 peak x its fp8_eff (the "fp8"
        recipe's GEMMs, a program's own torch._scaled_mm), or its INT8 peak x matmul_eff (no INT8
        GEMM efficiency is measured); scaled as an override scales matmul_eff."""
        eff = getattr(self.chip, "fp8_eff", self.chip.matmul_eff) if dtype == fp8.PRECISION else self.chip.matmul_eff
        return self.chip.peak_flops(dtype) * eff * self.matmul_eff / self.chip.matmul_eff / self._flop_rate

    def _scaled_mm_speedup(self) -> float:
        if self.dtype == fp8.PRECISION:
            return self._fp8_speedup
        if (rate := getattr(self, "_scaled_speedup", None)) is not None:
            return rate
        if getattr(self.chip, "fp8_tflops", 1) is None:
            raise fp8.NoFp8(f"torch._scaled_mm on float8 operands: the emulated chip {self.chip.name!r} has no FP8 "
                            "tensor cores (its catalog fp8_tflops is \"none\"), and CUDA refuses the op below compute "
                            "capability 8.9; run the program's FP8 on a chip with FP8 (h100, h200, b200) or in BF16")
        object.__setattr__(self, "_scaled_speedup", self._low_rate(fp8.PRECISION))
        return self._scaled_speedup

    def casts(self, func, args, fixed=None) -> tuple | None:
        """(kernels, bytes, fixed bytes) of the scaling and casts before a Linear GEMM in FP8
        (kernels/fp8.py), or None for any other op and precision. Fixed as in op_parts."""
        if not self.fp8 or func._overloadpacket not in fp8.GEMMS:
            return None
        low = fp8.operands(func, args)
        if not low:
            return None
        moved = [fp8.cast_bytes(t, self.itemsize(t)) for t in low]
        fixed_bytes = sum(b for t, b in zip(low, moved) if fixed is not None and fixed(t))
        return fp8.CAST_KERNELS * len(low), sum(moved), fixed_bytes

    def cast_seconds(self, kernels: int, nbytes: float) -> float:
        """Emulated seconds of `kernels` memory-bound kernels moving `nbytes` in all."""
        return kernels * self._launch_s + nbytes / self._byte_rate

    def _bytes(self, x, fixed) -> tuple[int, int]:
        """(bytes, fixed bytes) of the tensors in the sequence x, nested in lists and tuples."""
        nbytes = fixed_bytes = 0
        for y in x:
            if isinstance(y, torch.Tensor):
                n = y.numel() * self.itemsize(y)
                nbytes += n
                if fixed is not None and fixed(y):
                    fixed_bytes += n
            elif isinstance(y, (list, tuple)):
                n, f = self._bytes(y, fixed)
                nbytes += n
                fixed_bytes += f
        return nbytes, fixed_bytes

    def matmul_cost(self, m: int, k: int, n: int, fp8: bool = False) -> OpCost:
        """Cost of one (m, k) @ (k, n) matmul, without running it; fp8: as torch._scaled_mm on float8
        operands with per-tensor scales (what the MAMF finder times: the GEMM alone, no casts)."""
        a, b = (torch.empty(*s, device="meta", dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16)
                for s in ((m, k), (k, n)))
        out = torch.empty(m, n, device="meta", dtype=torch.bfloat16)
        if not fp8:
            return self.op_cost(torch.ops.aten.mm.default, (a, b), None, out)
        scale = torch.empty((), device="meta")
        return self.op_cost(torch.ops.aten._scaled_mm.default, (a, b, scale, scale), {"out_dtype": torch.bfloat16}, out)


def _memo_flops(func, formula, args, kwargs, out) -> float:
    """FLOPs of one op from its formula (the registry's take raw tensors and out_val), looked up
    by what the formula can see (shapes, dtypes, other arguments) after the first time."""
    try:
        key = (func, _signature(args), _signature(tuple((kwargs or {}).items())), _signature(out))
        return _FLOPS[key]
    except KeyError:
        flops = formula(*args, **(kwargs or {}), out_val=out)
        if len(_FLOPS) >= _FLOPS_MAX:
            _FLOPS.clear()
        _FLOPS[key] = flops
        return flops
    except TypeError:  # an unhashable argument: no memo
        return formula(*args, **(kwargs or {}), out_val=out)
