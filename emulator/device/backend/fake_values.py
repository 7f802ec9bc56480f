"""The values of small integer tensors in a program on fake tensors, under balanced routing.

Fake tensors hold no data, so a value a program reads from one (`.item()`, `.tolist()`) is 0
(fake/program.py). That is harmless for a printed loss, but a mixture-of-experts program sizes its
token dispatch by data: torchtitan's MoE builds a routing map from the router's top-k expert ids,
counts the tokens per expert, exchanges the counts (an all-to-all) and reads them as the split
sizes of the token all-to-all. Read as 0, the dispatch moves nothing and the experts compute
nothing.

So under `relay launch --tensors fake` an integer or bool tensor of at most LIMIT bytes carries its
value beside it, a real tensor, computed as follows:
- a top-k's indices over data with no value (the router's choice over its scores) are round-robin:
  row r's j-th choice is expert (r k + j) mod E, so every expert receives the same number of tokens
  (within one), the balanced routing Relay's own plans and the published MoE rows assume
  (torchtitan's own `--debug.moe_force_load_balance` routes the same way);
- factories (arange, zeros, full, and their `_like` / `new_` forms) are computed; `empty` ones
  (whose contents are whatever memory held) carry none;
- any other op whose fake inputs all carry values is run on those values (a routing map's scatter,
  its sum, a cumsum, an index, a repeat_interleave), and integer or bool outputs keep theirs; where
  that fails, or an in-place op reads an input without a value, what it writes loses its value,
  and so does every tensor on the same storage (its views, its base);
- a functional wait passes its input's value on, and a functional all-to-all of equal splits gives
  this rank's chunk of every peer's input, every rank's input taken to be this rank's (balanced
  routing: every rank counts the same); any other collective's output, and whatever a collective of
  the relay backend writes, carries none (the engine forgets it: `forget`).
A read of a tensor with a value returns it. Float tensors never carry one (the model's data).
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _resolve_process_group
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._pytree import tree_leaves, tree_map_only

LIMIT = 64 << 20  # bytes: a routing map of 4 x 4096 tokens x 256 experts (bool) is 4 MiB
_aten = torch.ops.aten
_TOPK = {_aten.topk.default}
_FACTORIES = {_aten.arange.default, _aten.arange.start, _aten.arange.start_step, _aten.zeros.default,
              _aten.ones.default, _aten.full.default, _aten.scalar_tensor.default}
_LIKE = {_aten.zeros_like.default, _aten.ones_like.default, _aten.full_like.default, _aten.new_zeros.default,
         _aten.new_ones.default, _aten.new_full.default}
_EMPTY = {_aten.empty_like.default, _aten.new_empty.default, _aten.new_empty_strided.default,
          _aten.empty.memory_format, _aten.empty_strided.default}
_F = torch.ops._c10d_functional
_PASS = {_F.all_to_all_single.default, _F.wait_tensor.default}
_SPECIAL = _TOPK | _FACTORIES | _LIKE | _PASS
_COLLECTIVES = ("_c10d_functional", "_c10d_functional_autograd", "c10d")
# storages (their _cdata) an op wrote without a value, and when (a count): a value given to a tensor on
# one before that is gone (a storage freed and its address reused later is not: its tensors' values are newer)
_unknown: dict = {}
_clock = itertools.count()


def _kept(t) -> bool:
    return (isinstance(t, FakeTensor) and not t.dtype.is_floating_point and not t.dtype.is_complex
            and t.numel() * t.element_size() <= LIMIT)


def of(t):
    """The value `t` carries, or None."""
    value = getattr(t, "_relay_value", None) if isinstance(t, FakeTensor) else None
    if value is not None and _unknown and _unknown.get(t.untyped_storage()._cdata, -1) > t._relay_at:
        del t._relay_value
        return None
    return value


def read(t):
    """The Python number a one-element tensor's value holds, or None where it carries none."""
    value = of(t)
    if value is None:
        return None
    with unset_fake_temporarily():
        return value.item()


def forget(tensors) -> None:
    """What a collective writes carries no value (the relay backend calls this for its outputs)."""
    for t in tensors:
        if isinstance(t, FakeTensor) and hasattr(t, "_relay_value"):
            _unknown[t.untyped_storage()._cdata] = next(_clock)


def _set(t, value) -> None:
    if not (_kept(t) and isinstance(value, torch.Tensor) and value.shape == t.shape and value.dtype == t.dtype):
        return
    if value.stride() != t.stride():  # (a factory's value is contiguous where fake mode kept strides)
        value = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(value)
    t._relay_value, t._relay_at = value, next(_clock)


def _mutated(func, args, kwargs) -> list:
    out = []
    for i, a in enumerate(func._schema.arguments if hasattr(func, "_schema") else ()):
        if a.alias_info is not None and a.alias_info.is_write:
            out.append(args[i] if i < len(args) else kwargs.get(a.name))
    return out


def _cpu(kwargs: dict) -> dict:
    return {**kwargs, "device": torch.device("cpu")} if "device" in kwargs else kwargs


def after(func, args, kwargs, out) -> None:
    """Give `out` (the fake answer of func(*args, **kwargs)) its value, where it has one. This runs
    for every op of a fake launched program, so an op none of whose inputs carries a value (nearly
    all) returns after one shallow scan of its arguments."""
    if func in _SPECIAL and not (func in _TOPK and of(args[0]) is not None):
        with unset_fake_temporarily():  # the values are real tensors, computed outside fake mode
            try:
                _special(func, args, kwargs, out)
            except Exception:  # noqa: BLE001 (a value Relay cannot compute is no value)
                pass
        return
    fakes = [a for a in (*args, *kwargs.values()) if isinstance(a, FakeTensor)]
    fakes += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, FakeTensor)]
    known = [hasattr(t, "_relay_value") for t in fakes]
    if not any(known):
        return
    if not all(known) or func in _EMPTY or not isinstance(func, torch._ops.OpOverload) or \
            torch.Tag.nondeterministic_seeded in func.tags or func.namespace in _COLLECTIVES:
        forget(_mutated(func, args, kwargs))  # an in-place op reading an unknown value: now unknown
        return
    with unset_fake_temporarily():
        try:
            real = tree_map_only(FakeTensor, of, (args, kwargs))
            result = func(*real[0], **_cpu(real[1]))
        except Exception:  # noqa: BLE001 (as above: what it writes is unknown)
            forget(_mutated(func, args, kwargs))
            return
        for t, v in zip(tree_leaves(out), tree_leaves(result)):
            if isinstance(t, FakeTensor) and isinstance(v, torch.Tensor):
                _set(t, v)


def _special(func, args, kwargs, out) -> None:
    if func in _TOPK:  # (over data with no value: the router's scores)
        indices, k = out[1], out[1].shape[-1] if out[1].dim() else 1
        dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
        if _kept(indices) and dim in (-1, args[0].dim() - 1):
            rows = indices.numel() // max(k, 1)
            robin = torch.arange(rows * k).view(*indices.shape[:-1], k) % args[0].shape[-1]
            _set(indices, robin.to(indices.dtype))
    elif func is _F.wait_tensor.default:
        _set(out, of(getattr(args[0], "elem", args[0])))  # (its argument: the AsyncCollectiveTensor)
    elif func is _F.all_to_all_single.default:  # (input, output_splits, input_splits, group)
        value, group = of(args[0]), _resolve_process_group(args[3])
        world, rank = group.size(), dist.get_rank(group)
        if value is not None and value.shape[0] % world == 0 and list(args[1]) == list(args[2]):
            _set(out, value.reshape(world, -1)[rank].repeat(world).view(out.shape))
    elif _kept(out):  # a factory: computed
        like = tree_map_only(FakeTensor, lambda t: torch.empty((), dtype=t.dtype).expand(t.shape), (args, kwargs))
        _set(out, func(*like[0], **_cpu(like[1])))
