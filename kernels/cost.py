"""Per-op cost model: what one aten op would cost on the emulated chip (a roofline).

    seconds = launch_s + max(flops / (peak[dtype] * matmul_eff), bytes / (hbm_Bps * mem_eff))

FLOPs come from PyTorch's own formulas (torch.utils.flop_counter's registry: matmuls, convolutions,
attention); every other op has none and is memory-bound. Bytes are the op's inputs plus outputs,
floating tensors counted at the *emulated* dtype (bf16 by default, whatever the host computes in),
integer and bool tensors at their real size. Views and bare allocations launch no kernel: they cost 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry

from emulator.chips import Chip, get as get_chip

ITEMSIZE = {"bf16": 2, "fp16": 2, "fp8": 1}
# allocations that write nothing (their bytes are written by the op that fills them)
_FREE = {torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided,
         torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided}


@dataclass(frozen=True)
class OpCost:
    seconds: float  # emulated seconds
    flops: float
    bytes: float  # at the emulated dtype


_ZERO = OpCost(0.0, 0.0, 0.0)
_KIND: dict = {}  # op -> 0 (free), 1 (memory-bound) or its FLOP formula
_FLOPS: dict = {}  # (op, shapes and other arguments) -> FLOPs: shapes repeat from step to step,
#                    and PyTorch's formulas (with their tree_maps) cost more than the lookup
_FLOPS_MAX = 100_000  # distinct entries kept at most (inputs whose shapes never repeat)


def _shape(x):
    return x.shape if isinstance(x, torch.Tensor) else x


def _signature(x):
    """What a FLOP formula can see of an argument: a tensor's shape (and dtype), anything else."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape), x.dtype
    if isinstance(x, (list, tuple)):
        return tuple(_signature(y) for y in x)
    return x


@dataclass(frozen=True)
class CostModel:
    chip: Chip
    dtype: str = "bf16"  # emulated dtype of floating tensors
    matmul_eff: float | None = None  # None: the chip's default
    mem_eff: float | None = None
    launch_us: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "chip", get_chip(self.chip))
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
                flop_registry.get(func._overloadpacket, 1)
        if kind == 0:
            return _ZERO
        flops = 0
        if kind != 1:  # a FLOP formula, computed once per distinct signature
            try:
                key = (func, _signature(args), _signature(tuple((kwargs or {}).items())), _signature(out))
                flops = _FLOPS[key]
            except KeyError:
                flops = _flops(kind, args, kwargs, out)
                if len(_FLOPS) >= _FLOPS_MAX:
                    _FLOPS.clear()
                _FLOPS[key] = flops
            except TypeError:  # an unhashable argument: no memo
                flops = _flops(kind, args, kwargs, out)
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


def _flops(formula, args, kwargs, out) -> float:
    return formula(*tree_map(_shape, args), **tree_map(_shape, kwargs or {}), out_val=tree_map(_shape, out))
