"""Per-op cost model: what one aten op would cost on the emulated chip (a roofline).

    seconds = launch_s + max(flops / (peak[dtype] * matmul_eff), bytes / (hbm_Bps * mem_eff))

FLOPs come from PyTorch's own formulas (torch.utils.flop_counter's registry: matmuls, convolutions,
attention); every other op has none and is memory-bound. Bytes are the op's inputs plus outputs,
floating tensors counted at the *emulated* dtype (bf16 by default, whatever the host computes in),
integer and bool tensors at their real size. Views and bare allocations launch no kernel: they cost 0.

The chip is any object with the catalog's SI views (`peak_flops(dtype)`, `hbm_Bps`) and the
default `matmul_eff`, `mem_eff` and `launch_us`: an `emulator.hardware.chips.Chip`. This layer
sits below the rest of Relay and imports none of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry

ITEMSIZE = {"bf16": 2, "fp16": 2, "fp8": 1}
# allocations that write nothing (their bytes are written by the op that fills them)
_FREE = {torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided,
         torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided,
         # metadata queries, which fake tensors answer through the dispatcher: no kernel runs
         torch.ops.prim.device, torch.ops.prim.layout, torch.ops.aten.sym_size, torch.ops.aten.sym_stride,
         torch.ops.aten.sym_numel, torch.ops.aten.sym_storage_offset}


@dataclass(frozen=True)
class OpCost:
    seconds: float  # emulated seconds
    flops: float
    bytes: float  # at the emulated dtype


_ZERO = OpCost(0.0, 0.0, 0.0)
_aten = torch.ops.aten
# torch's FLOP registry lacks the CPU flash-attention kernels that scaled_dot_product_attention
# runs on a CPU host (and on fake CPU tensors); they do the work of the GPU flash kernels.
_FLOPS = {**flop_registry,
          _aten._scaled_dot_product_flash_attention_for_cpu:
              flop_registry[_aten._scaled_dot_product_flash_attention],
          _aten._scaled_dot_product_flash_attention_for_cpu_backward:
              flop_registry[_aten._scaled_dot_product_flash_attention_backward]}
_KIND: dict = {}  # op -> 0 (free), 1 (memory-bound) or its FLOP formula


def _shape(x):
    return x.shape if isinstance(x, torch.Tensor) else x


@dataclass(frozen=True)
class CostModel:
    chip: object  # an emulator.hardware.chips.Chip (or anything with its SI views)
    dtype: str = "bf16"  # emulated dtype of floating tensors
    matmul_eff: float | None = None  # None: the chip's default
    mem_eff: float | None = None
    launch_us: float | None = None

    def __post_init__(self):
        if self.dtype not in ITEMSIZE:
            raise ValueError(f"dtype = {self.dtype!r} is not an emulated dtype; "
                             f"choose one of {', '.join(ITEMSIZE)}")
        for f, lo in (("matmul_eff", 0), ("mem_eff", 0), ("launch_us", -1e-300)):
            v = getattr(self, f)
            if v is None:
                object.__setattr__(self, f, getattr(self.chip, f))
            elif not isinstance(v, (int, float)) or not v > lo or (f != "launch_us" and v > 1):
                rng = "a fraction in (0, 1]" if f != "launch_us" else "a number >= 0"
                raise ValueError(f"{f} = {v!r} is invalid; give {rng}")
        # resolved once: the hot path below only multiplies
        object.__setattr__(self, "_flop_rate", self.chip.peak_flops(self.dtype) * self.matmul_eff)
        object.__setattr__(self, "_byte_rate", self.chip.hbm_Bps * self.mem_eff)
        object.__setattr__(self, "_launch_s", self.launch_us / 1e6)
        object.__setattr__(self, "_float_size", ITEMSIZE[self.dtype])

    def tensor_bytes(self, t: torch.Tensor) -> int:
        size = ITEMSIZE[self.dtype] if t.is_floating_point() else t.element_size()
        return t.numel() * size

    def seconds(self, flops: float, nbytes: float) -> float:
        return self._launch_s + max(flops / self._flop_rate, nbytes / self._byte_rate)

    def op_cost(self, func, args=(), kwargs=None, out=None) -> OpCost:
        """Cost of one executed aten op (func is an OpOverload, out its result). This runs for
        every op a device executes, so it walks arguments by hand rather than with pytree."""
        kind = _KIND.get(func)
        if kind is None:
            kind = _KIND[func] = 0 if func.is_view or func._overloadpacket in _FREE else \
                _FLOPS.get(func._overloadpacket, 1)
        if kind == 0:
            return _ZERO
        flops = 0
        if kind != 1:  # a FLOP formula
            flops = kind(*tree_map(_shape, args), **tree_map(_shape, kwargs or {}), out_val=tree_map(_shape, out))
        nbytes = self._bytes(args) + self._bytes(out)
        if kwargs:
            nbytes += self._bytes(tuple(kwargs.values()))
        return OpCost(self.seconds(flops, nbytes), float(flops), float(nbytes))

    def _bytes(self, x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * (self._float_size if x.is_floating_point() else x.element_size())
        if isinstance(x, (list, tuple)):
            return sum(self._bytes(y) for y in x)
        return 0

    def matmul_cost(self, m: int, k: int, n: int) -> OpCost:
        """Cost of one (m, k) @ (k, n) matmul, without running it."""
        flops, nbytes = 2.0 * m * k * n, float((m * k + k * n + m * n) * ITEMSIZE[self.dtype])
        return OpCost(self.seconds(flops, nbytes), flops, nbytes)
