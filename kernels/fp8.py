"""FP8 compute as torchao's float8 training runs it (the emulated precision "fp8").

torchtitan's float8 converter swaps each nn.Linear for torchao's Float8Linear (tensorwise or
rowwise dynamic scaling). Its three GEMMs run in FP8: the forward (input @ weight^T), the input
gradient (grad_out @ weight) and the weight gradient (grad_out^T @ input); everything else
(attention, norms, activations, the optimizer) stays in BF16. Before each FP8 GEMM each of its
two operands is scaled and cast: an amax reduction over the BF16 tensor (a memory-bound read),
then a cast kernel that reads it again and writes its FP8 copy. Float8Linear saves its BF16
input and weight for backward (`ctx.save_for_backward(input_hp, weight_hp_t)` in
torchao/float8/float8_linear.py) and casts them again there, so parameters, gradients, saved
activations and messages stay at BF16's 2 bytes.

So, per aten GEMM of a Linear layer (`mm`, `addmm` on matrices; attention's batched `bmm` and
fused kernels stay BF16), the cost model (kernels/cost.py) charges
    the GEMM    FLOPs at the FP8 peak x the chip's fp8_eff (catalog `fp8_matmul_eff`), its two
                operands read at 1 byte per element, its BF16 output written at 2;
    the casts   per operand 2 kernels: amax (reads 2 bytes per element), cast (reads 2, writes 1).
Not modelled: torch.compile fusing a cast into the op before it, FSDP2's float8 all-gather
(off by default in torchtitan), and torchtitan's per-layer filters (its Llama configs keep the
output head in BF16 with filter_fqns = ["output"]; Relay charges every Linear in FP8).

A program that runs torchao's float8 training itself (`relay launch` of torchtitan with its float8
converter: launch/titan_configs.py) is charged as it runs, at any emulated dtype: torchao's
Float8TrainingTensor is a tensor subclass whose `mm` runs `aten._scaled_mm` on its float8 data
(torchao/float8/float8_ops.py, addmm_float8_unwrapped). A dispatch mode sees the subclass's `mm`
first and would charge it as a BF16 GEMM, never seeing the `_scaled_mm` it runs; so the throttle
hands the ops of such a wrapper (WRAPPERS) back to the subclass (`defers`) and charges the ops it
runs on plain tensors: the `_scaled_mm` at the chip's FP8 peak x fp8_eff with its float8 operands
at 1 byte an element (`scaled`), and its scales, casts and amaxes as the memory-bound ops they
are. On a chip without FP8 (catalog fp8_tflops "none": A100, Ascend) the `_scaled_mm` is refused
as CUDA refuses it below compute capability 8.9 (`NoFp8`).
"""

from __future__ import annotations

import torch

PRECISION = "fp8"  # the emulated dtype name that selects this recipe
OPERAND_BYTES = 1  # an FP8 GEMM operand (e4m3 or e5m2), per element
CAST_KERNELS = 2  # per operand: amax reduction, then the scaled cast
_aten = torch.ops.aten
GEMMS = {_aten.mm, _aten.addmm}  # a Linear layer's GEMMs (2-D operands)
# floating dtypes of one byte an element: charged at their own size, whatever the emulated dtype
BYTE_FLOATS = frozenset({torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
                         torch.float8_e8m0fnu})
SCALED_MM = {_aten._scaled_mm}  # torch._scaled_mm: (a, b, scale_a, scale_b, bias, scale_result, out_dtype, ...)
# tensor subclasses charged as the ops they run on their inner tensors (module.qualname, so that the
# kernels need not import torchao)
WRAPPERS = frozenset({"torchao.float8.float8_training_tensor.Float8TrainingTensor"})


class NoFp8(RuntimeError):
    """An FP8 GEMM on an emulated chip that has none."""


_WRAPPER: dict = {}  # type -> whether it is one of WRAPPERS (this runs for every op)


def defers(types) -> bool:
    """Whether an op with arguments of these types is left to their subclass (WRAPPERS)."""
    for t in types:
        w = _WRAPPER.get(t)
        if w is None:
            w = _WRAPPER[t] = f"{t.__module__}.{t.__qualname__}" in WRAPPERS
        if w:
            return True
    return False


def scaled(func, args) -> bool:
    """Whether func is torch._scaled_mm on float8 operands (charged at the FP8 peak)."""
    return func._overloadpacket in SCALED_MM and getattr(args[0], "dtype", None) in BYTE_FLOATS


def operands(func, args) -> tuple | None:
    """The two FP8 operands of a Linear GEMM (func's overload packet in GEMMS), or None."""
    a, b = args[-2], args[-1]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point() \
            and a.dim() == 2 and b.dim() == 2:
        return a, b
    return None


def cast_bytes(t: torch.Tensor, stored_size: int) -> int:
    """Bytes the amax and the cast of one operand move: read twice at its stored size, written
    once in FP8."""
    n = t.numel()
    return n * (2 * stored_size + OPERAND_BYTES)
