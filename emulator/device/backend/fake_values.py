"""The values of small integer tensors in a program on fake tensors, under balanced routing.

Fake tensors hold no data, so a value a program reads from one (`.item()`, `.tolist()`) is 0
(fake/program.py). That is harmless for a printed loss, but a mixture-of-experts program sizes its
token dispatch by data: torchtitan's MoE builds a routing map from the router's top-k expert ids,
counts the tokens per expert, exchanges the counts (an all-to-all) and reads them as the split
sizes of the token all-to-all. Read as 0, the dispatch moves nothing and the experts compute
nothing.

So under `relay launch --tensors fake` an integer or bool tensor of at most LIMIT elements carries
its value beside it, a real tensor, computed as follows:
- a top-k's indices (the router's choice) are round-robin: row r's j-th choice is expert
  (r k + j) mod E, so every expert receives the same number of tokens (within one), the balanced
  routing Relay's own plans and the published MoE rows assume (torchtitan's own
  `_debug_force_load_balance` routes the same way);
- factories (arange, zeros, full, and their `_like` / `new_` forms) are computed;
- any other op whose fake inputs all carry values is run on those values (a routing map's scatter,
  its sum, a cumsum, an index, a repeat_interleave), and integer or bool outputs keep theirs; an
  in-place op on a tensor whose other inputs lack values drops its value;
- a functional wait passes its input's value on, and a functional all-to-all too where every
  element is the same (balanced counts on every rank: what each rank sends is what it receives).
A read of a tensor with a value returns it. Float tensors never carry one (the model's data).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._pytree import tree_leaves, tree_map_only

LIMIT = 1 << 24  # elements: a routing map of 4 x 4096 tokens x 256 experts is 4M
_aten = torch.ops.aten
_TOPK = {_aten.topk.default}
_FACTORIES = {_aten.arange.default, _aten.arange.start, _aten.arange.start_step, _aten.zeros.default,
              _aten.ones.default, _aten.full.default, _aten.scalar_tensor.default}
_LIKE = {_aten.zeros_like.default, _aten.ones_like.default, _aten.full_like.default, _aten.new_zeros.default,
         _aten.new_ones.default, _aten.new_full.default}
_F = torch.ops._c10d_functional
_PASS = {_F.all_to_all_single.default, _F.wait_tensor.default}
_SPECIAL = _TOPK | _FACTORIES | _LIKE | _PASS


def _kept(t) -> bool:
    return (isinstance(t, FakeTensor) and not t.dtype.is_floating_point and not t.dtype.is_complex
            and t.numel() <= LIMIT)


def of(t):
    """The value `t` carries, or None."""
    return getattr(t, "_relay_value", None) if isinstance(t, FakeTensor) else None


def read(t):
    """The Python number a one-element tensor's value holds, or None where it carries none."""
    value = of(t)
    if value is None:
        return None
    with unset_fake_temporarily():
        return value.item()


def _set(t, value) -> None:
    if _kept(t) and isinstance(value, torch.Tensor) and value.shape == t.shape:
        t._relay_value = value


def _mutated(func, args, kwargs) -> list:
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            out.append(args[i] if i < len(args) else kwargs.get(a.name))
    return out


def _cpu(kwargs: dict) -> dict:
    return {**kwargs, "device": torch.device("cpu")} if "device" in kwargs else kwargs


def after(func, args, kwargs, out) -> None:
    """Give `out` (the fake answer of func(*args, **kwargs)) its value, where it has one. This runs
    for every op of a fake launched program, so an op none of whose inputs carries a value (nearly
    all) returns after one shallow scan of its arguments."""
    if func in _SPECIAL:
        with unset_fake_temporarily():  # the values are real tensors, computed outside fake mode
            _special(func, args, kwargs, out)
        return
    fakes = [a for a in (*args, *kwargs.values()) if isinstance(a, FakeTensor)]
    fakes += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, FakeTensor)]
    known = [hasattr(t, "_relay_value") for t in fakes]
    if not any(known):
        return
    if not all(known) or torch.Tag.nondeterministic_seeded in func.tags:
        for t in _mutated(func, args, kwargs):  # an in-place op reading an unknown value: now unknown
            if isinstance(t, FakeTensor) and hasattr(t, "_relay_value"):
                del t._relay_value
        return
    with unset_fake_temporarily():
        real = tree_map_only(FakeTensor, of, (args, kwargs))
        result = func(*real[0], **_cpu(real[1]))
        for t, v in zip(tree_leaves(out), tree_leaves(result)):
            if isinstance(t, FakeTensor) and isinstance(v, torch.Tensor):
                _set(t, v)


def _special(func, args, kwargs, out) -> None:
    if func in _TOPK:
        indices, k = out[1], out[1].shape[-1] if out[1].dim() else 1
        dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
        if _kept(indices) and dim in (-1, args[0].dim() - 1):
            rows = indices.numel() // max(k, 1)
            robin = torch.arange(rows * k).view(*indices.shape[:-1], k) % args[0].shape[-1]
            _set(indices, robin.to(indices.dtype))
    elif func in _PASS:
        value = of(getattr(args[0], "elem", args[0]))  # (a wait's argument: the AsyncCollectiveTensor)
        if value is not None and (func is _F.wait_tensor.default or _even(value)):
            _set(out, value.reshape(out.shape) if value.numel() == out.numel() else None)
    elif _kept(out if isinstance(out, torch.Tensor) else None):  # a factory: computed
        like = tree_map_only(FakeTensor, lambda t: torch.empty(t.shape, dtype=t.dtype), (args, kwargs))
        _set(out, func(*like[0], **_cpu(like[1])))


def _even(value) -> bool:
    """Every element the same (balanced counts): each rank then receives what it sends."""
    return bool((value == value.flatten()[0]).all()) if value.numel() else True
