"""Fake mode's answers, remembered under a cheap key.

FakeTensorMode caches its answers too, but it builds each key from every argument's full
metadata (about 0.2 ms an op on a 2-core host, and a full-size DeepSeek-V3 device dispatches
some 400,000 ops a step). For three kinds of aten op returning one tensor, whose output's shape
does not depend on the data (the op's tags), the answer is fixed by the inputs' shapes, strides,
storage offsets and dtypes and the other arguments:
- a fresh output (no view, no mutation): an empty meta tensor of the remembered metadata, wrapped,
  as fake mode's own cache makes it;
- a view: the same, on the storage of the argument it views (as fake mode's cache does);
- an in-place op that changes no metadata (add_, copy_, lerp_...): the argument it mutates.
So the first call with a key runs fake mode and keeps what its answer was, if it is what the
kind promises (a fresh fake tensor with no constant and no storage shared with an input; a view
of that argument's storage; that very argument); later calls with the key are answered from it.
Calls with any other argument (a DTensor, a fake tensor carrying a constant or of another mode)
go to fake mode as before.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor, in_kernel_invocation_manager

_DATA = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output, torch.Tag.inplace_view)
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
_UNSEEN = object()
_FAKE = torch._C._TorchDispatchModeKey.FAKE


class FreshOps:
    """Runs ops under `mode` (a FakeTensorMode), remembering their answers (see the module)."""

    def __init__(self, mode):
        self.mode = mode
        # key -> None (not remembered), ("inplace", i) or (view argument or None, shape, stride,
        # offset, dtype, device, requires_grad)
        self.memo: dict = {}
        self.kinds: dict = {}  # op -> its kind: None, ("fresh",), ("view", i), ("inplace", i)

    def run(self, func, args, kwargs):
        kind = self.kinds.get(func, _UNSEEN)
        if kind is _UNSEEN:
            kind = self.kinds[func] = _kind(func)
        key = self._key(func, args, kwargs) if kind else None
        if key is None:
            return func(*args, **kwargs)
        answer = self.memo.get(key, _UNSEEN)
        if answer is _UNSEEN:
            out = func(*args, **kwargs)
            self.memo[key] = _answer(kind, out, args, self.mode)
            return out
        if answer is None:
            return func(*args, **kwargs)
        if answer[0] == "inplace":
            return args[answer[1]]
        base, shape, stride, offset, dtype, device, grad = answer
        with in_kernel_invocation_manager(self.mode):
            out = torch.empty_strided(shape, stride, dtype=dtype, device="meta", requires_grad=grad)
            if base is not None:
                out.set_(args[base].untyped_storage(), offset, shape, stride)
        return FakeTensor(self.mode, out, device)

    def _key(self, func, args, kwargs) -> tuple | None:
        """(op, each argument's part), or None when an argument cannot be keyed or none is fake."""
        fakes = []  # one entry per fake input (no tensor: see _part)
        try:
            key = (func, *(_part(a, self.mode, fakes) for a in args),
                   *((k, _part(v, self.mode, fakes)) for k, v in kwargs.items()))
        except _Unkeyed:
            return None
        # (an op without fake inputs, a factory, answers with a fake tensor only under the mode)
        return key if fakes or torch._C._get_dispatch_mode(_FAKE) is self.mode else None


def _part(a, mode, fakes: list):
    """An argument's part of the key. A function of the module, not a closure in _key: a nested
    function that calls itself is a reference cycle (function -> its cell -> function), and the
    cycle kept every fake input of every op alive until Python's cyclic collector ran; their
    storages stayed counted in the emulated HBM (torchtitan turns the collector off between its
    collections: the HBM count grew every step)."""
    if type(a) is FakeTensor:
        if a.fake_mode is not mode or a.constant is not None:
            raise _Unkeyed
        fakes.append(True)  # (its device too: a model built on "meta" runs the same ops at the same shapes)
        return a.shape, a.stride(), a.storage_offset(), a.dtype, a.fake_device
    if type(a) in _PLAIN:
        return type(a), a
    if type(a) in (list, tuple, torch.Size):
        return type(a), tuple(_part(x, mode, fakes) for x in a)
    raise _Unkeyed


class _Unkeyed(Exception):
    """An argument the key cannot stand for."""


def _kind(func) -> tuple | None:
    if not isinstance(func, torch._ops.OpOverload) or func.namespace != "aten" \
            or any(t in func.tags for t in _DATA):
        return None
    schema = func._schema
    if len(schema.returns) != 1 or str(schema.returns[0].type) != "Tensor":
        return None
    alias = schema.returns[0].alias_info
    if alias is None:
        return None if schema.is_mutable else ("fresh",)
    # the one argument the output aliases: viewed (no argument written) or written in place
    same = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None
            and set(a.alias_info.after_set) == set(alias.after_set)]
    written = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    if len(same) != 1 or schema.arguments[same[0]].kwarg_only:  # (answered from args by position)
        return None
    if func.is_view and not written:
        return "view", same[0]
    if written == same and alias.is_write:
        return "inplace", same[0]
    return None


def _answer(kind: tuple, out, args, mode) -> tuple | None:
    """What to answer next time, if `out` is what the op's kind promises, else None."""
    if kind[0] == "inplace":
        return kind if len(args) > kind[1] and out is args[kind[1]] else None
    if type(out) is not FakeTensor or out.fake_mode is not mode or out.constant is not None \
            or out.is_conj() or out.is_neg():
        return None
    storage = out.untyped_storage()._cdata
    if kind[0] == "view":
        base = kind[1]
        if base >= len(args) or type(args[base]) is not FakeTensor \
                or args[base].untyped_storage()._cdata != storage:
            return None
    else:
        base = None
        inputs = [x for a in args for x in (a if type(a) in (list, tuple) else (a,))]
        if out.storage_offset() != 0 or any(type(x) is FakeTensor and x.untyped_storage()._cdata == storage
                                            for x in inputs):
            return None
    return (base, tuple(out.shape), out.stride(), out.storage_offset(), out.dtype, out.fake_device,
            out.requires_grad)
