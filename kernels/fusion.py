"""Kernel fusion as Megatron-LM with Transformer Engine (or torch.compile) runs a step: the
`fusion = "fused"` mode of the cost model (kernels/cost.py), applied op by op by the throttle.

Eager PyTorch launches one kernel per aten op, and each reads its inputs from HBM and writes its
output there: an RMSNorm is six kernels (pow, mean, add, rsqrt, mul, mul), SwiGLU three, a
rotary embedding five. A fusing framework runs each such chain of memory-bound ops as one kernel
that reads the chain's inputs once, keeps its intermediates in registers, and writes its outputs:

    Transformer Engine   RMSNorm / LayerNorm fused (and fused into the next Linear's FP8 cast:
                         LayerNormLinear), SwiGLU / GeLU with the FP8 cast of their output, fused
                         RoPE, fused cross entropy, FusedAdam (one multi-tensor kernel)
    Megatron-LM          bias-dropout-add, bias-SwiGLU / bias-GeLU, fused RoPE, fused softmax,
                         fused cross entropy (megatron/core/fusions/); TransformerConfig's
                         bias_activation_fusion, bias_dropout_fusion and masked_softmax_fusion are
                         on by default, apply_rope_fusion and cross_entropy_loss_fusion off unless a
                         config sets them (Relay's rule fuses those chains too: an approximation)
    torch.compile        Inductor fuses pointwise and reduction chains the same way

The rule Relay charges (no per-kernel table: it follows the data of the ops that run):

* A *chain* is a run of consecutive memory-bound ops (no FLOP formula: everything but GEMMs and
  attention) each reading a tensor an earlier op of the chain wrote. An op that reads none
  starts a new chain; a GEMM or attention kernel ends it.
* A chain pays one launch (its first op's). A tensor the chain wrote is read back from registers
  (free), and its write is dropped the first time the chain reads it; an input from outside the
  chain is read from HBM once per chain. Outputs are written.
* A dropped write is charged back (a *spill*: written, then read) if any later op outside the
  chain reads the tensor: a residual stream, or what eager autograd saved for backward (a
  fused kernel would have kept less; Relay keeps the conservative figure).
* An FP8 GEMM operand that the chain just before it wrote is cast by that chain (TE's
  LayerNormLinear and fused activations emit FP8 directly): no amax or cast kernel, only its
  FP8 copy written (fp8.OPERAND_BYTES per element).
* `_unsafe_view` (the reshape of a Linear's output) aliases its input and launches no kernel.

* A weight's FP8 casts (forward, and its transpose for the input gradient) are counted apart
  (`weight_casts`, when `weights` names the parameters): Transformer Engine casts a weight once a
  step and reuses the FP8 copy for the step's other microbatches (`is_first_microbatch`; TE user
  guide, Performance Optimizations, "FP8 weight caching": https://docs.nvidia.com/deeplearning/
  transformer-engine/user-guide/examples/advanced_optimizations.html), so the plan model charges
  them once a step (planner.cost).

Not modelled here: CUDA graphs (launch overhead hidden by graph replay), and the smaller
activations a fused kernel saves for backward (the memory model stays eager's).
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from relay.kernels import fp8

MODES = ("eager", "fused")  # CostModel.fusion
ALIAS = {torch.ops.aten._unsafe_view}  # ops that alias their input: no kernel on a GPU
_PRUNE = 4096  # dropped writes kept at most before the freed ones are forgotten


def check(fusion) -> None:
    if fusion not in MODES:
        raise ValueError(f"fusion = {fusion!r} is unknown; choose 'eager' (a kernel per aten op, as eager "
                         "PyTorch runs) or 'fused' (chains of memory-bound ops as one kernel, as Megatron-LM "
                         "with Transformer Engine or torch.compile runs them)")


def _tensors(x, out: list) -> list:
    for y in x:
        if isinstance(y, torch.Tensor):
            out.append(y)
        elif isinstance(y, (list, tuple)):
            _tensors(y, out)
    return out


def _key(t: torch.Tensor):
    try:
        return StorageWeakRef(t.untyped_storage())
    except (RuntimeError, NotImplementedError):  # no storage (sparse, nested): never fused
        return None


class Fuser:
    """The open chain of one device's op stream (one per Throttle)."""

    def __init__(self, size_of):
        self.size_of = size_of  # tensor -> bytes the cost model charges it (CostModel.tensor_bytes)
        self.written: dict = {}  # storages the open chain wrote -> their bytes
        self.read: set = set()  # storages from outside the chain it has read
        self.last: set = set()  # storages the chain closed last wrote (an FP8 GEMM's producer)
        self.dropped: dict = {}  # storage -> (its weak reference, bytes, fixed bytes): writes a chain dropped
        self.credit = 0.0  # dropped bytes not yet taken off the open chain's charge
        self.weights: set = set()  # storages of the parameters (their FP8 casts counted apart)
        self.weight_casts = [0, 0.0]  # kernels and bytes of the parameters' FP8 casts so far

    def _close(self) -> None:
        if self.written:
            self.last = set(self.written)
        self.written, self.read, self.credit = {}, set(), 0.0
        if len(self.dropped) > _PRUNE:
            self.dropped = {k: v for k, v in self.dropped.items() if not v[0].expired()}

    def _spill(self, key) -> tuple[float, float]:
        """(bytes, fixed bytes) to charge back for a dropped write now read outside its chain."""
        entry = self.dropped.pop(key, None)
        if entry is None or entry[0].expired():  # (a freed storage whose address was reused)
            return 0.0, 0.0
        return entry[1], entry[2]

    def other(self, args, kwargs) -> tuple[float, float]:
        """A GEMM or attention kernel (not fused): ends the chain; (bytes, fixed bytes) of the
        spills it reads, to add to its charge."""
        self._close()
        nbytes = fixed = 0.0
        for t in _tensors((args, tuple((kwargs or {}).values())), []):
            key = _key(t)
            if key is not None and key in self.dropped:
                b, f = self._spill(key)
                nbytes, fixed = nbytes + b, fixed + f
        return nbytes, fixed

    def fused_cast(self, t: torch.Tensor) -> bool:
        """Whether FP8 operand t was written by the chain just closed (its producer casts it)."""
        key = _key(t)
        return key is not None and key in self.last

    def memory_bound(self, func, args, kwargs, out, fixed=None) -> tuple[int, float, float] | None:
        """(launches, bytes, fixed bytes) of a memory-bound op in the chain rule (module doc), or
        None for an alias (no kernel). fixed as CostModel.op_parts'."""
        if func._overloadpacket in ALIAS:
            return None
        ins = _tensors((args, tuple((kwargs or {}).values())), [])
        outs = _tensors((out,) if isinstance(out, torch.Tensor) else (out or (),), [])
        keys = [_key(t) for t in ins]
        joins = any(k is not None and k in self.written for k in keys)
        if not joins:
            self._close()
        nbytes = fixed_bytes = 0.0
        for t, key in zip(ins, keys):
            if key is not None and key in self.written:  # from registers; its write dropped once
                b = self.written.pop(key)
                if b:
                    self.credit += b
                    fb = b if fixed is not None and fixed(t) else 0.0
                    self.dropped[key] = (key, b, fb)
                self.written[key] = 0.0  # (still the chain's: later reads are free)
            elif key is None or key not in self.read:
                b = self.size_of(t)
                fb = b if fixed is not None and fixed(t) else 0.0
                sb, sf = self._spill(key) if key is not None else (0.0, 0.0)
                nbytes, fixed_bytes = nbytes + b + sb, fixed_bytes + fb + sf
                if key is not None:
                    self.read.add(key)
        for t in outs:
            key, b = _key(t), self.size_of(t)
            nbytes += b
            fixed_bytes += b if fixed is not None and fixed(t) else 0.0
            if key is not None:
                self.written[key] = self.written.get(key, 0.0) + b
                self.dropped.pop(key, None)  # rewritten: an older dropped write is moot
        taken = min(self.credit, nbytes)
        self.credit -= taken
        share = taken * (fixed_bytes / nbytes) if nbytes else 0.0
        return (0 if joins else 1), nbytes - taken, fixed_bytes - share


def casts(fuser: Fuser, func, args, itemsize, fixed=None) -> tuple | None:
    """(kernels, bytes, fixed bytes) of the FP8 casts before a Linear GEMM (kernels/fp8.py) under
    fusion: an operand the chain just before wrote is cast by it (its FP8 copy written, no
    kernel); any other (a weight, an attention output) is scaled and cast as eager does, read at
    itemsize(operand) bytes an element (CostModel.itemsize)."""
    if func._overloadpacket not in fp8.GEMMS:
        return None
    low = fp8.operands(func, args)
    if not low:
        return None
    kernels = nbytes = fixed_bytes = 0
    for t in low:
        fused = fuser.fused_cast(t)
        b = t.numel() * fp8.OPERAND_BYTES if fused else fp8.cast_bytes(t, itemsize(t))
        k = 0 if fused else fp8.CAST_KERNELS
        kernels, nbytes = kernels + k, nbytes + b
        fixed_bytes += b if fixed is not None and fixed(t) else 0
        if fuser.weights and _key(t) in fuser.weights:
            fuser.weight_casts[0] += k
            fuser.weight_casts[1] += b
    return kernels, nbytes, fixed_bytes
