"""Workloads: what the emulated devices train.

A workload is three callables (and a few defaults):
    build_model() -> nn.Module
    batches(rank, world, per_device_batch, seed) -> iterator of batches; the global batch of a
        step is the concatenation of the ranks' batches in rank order
    loss(model, batch) -> scalar tensor, a mean over the batch

Built-ins: "mlp", "gpt-tiny", the Llama 3 sizes and "llama-debug" (llama.py), and the mixtures
of experts "deepseek-v3", "mixtral-8x7b" and "moe-debug" (moe.py). A user's workload is named by
import path "package.module:attribute", the attribute being a Workload or a function returning one.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from relay.errors import ConfigError


@dataclass(frozen=True)
class Workload:
    build_model: Callable  # () -> nn.Module
    batches: Callable  # (rank, world, per_device_batch, seed) -> Iterator[batch]
    loss: Callable  # (model, batch) -> scalar tensor (mean over the batch)
    name: str = "custom"
    tokens_per_sample: int | None = None  # set for language models: throughput in tokens/s
    lr: float = 1e-3  # default learning rate
    optimizer: str = "adamw"  # "adamw" or "sgd"
    loss_floor: float | None = None  # best achievable loss, when known (nats)
    config: object = None  # the model's configuration (a dataclass), for workloads built from one

    def __post_init__(self):
        for f in ("build_model", "batches", "loss"):
            if not callable(getattr(self, f)):
                raise ConfigError(f"workload {self.name!r}: {f} = {getattr(self, f)!r} is not callable")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"workload {self.name!r}: optimizer = {self.optimizer!r} is unknown; "
                             "choose 'adamw' or 'sgd'")


def shard(global_batch, rank: int, world: int):
    """Rank `rank`'s part of a global batch (a tensor or a tuple of tensors), split on dim 0."""
    if isinstance(global_batch, (tuple, list)):
        return type(global_batch)(shard(t, rank, world) for t in global_batch)
    n = global_batch.shape[0] // world
    return global_batch[rank * n:(rank + 1) * n]


BUILTINS = {"mlp": "relay.workloads.mlp:workload", "gpt-tiny": "relay.workloads.gpt:workload",
            **{name: f"relay.workloads.llama:{name}" for name in
               ("llama3-8b", "llama3-70b", "llama3-405b", "llama-debug")},
            **{name: f"relay.workloads.moe:{name}" for name in ("deepseek-v3", "mixtral-8x7b", "moe-debug")}}


def get(spec) -> Workload:
    """A Workload from a Workload, a built-in name, or an import path 'package.module:attribute'."""
    if isinstance(spec, Workload):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(f"workload = {spec!r} is not a workload; give a Workload, a built-in "
                         f"({', '.join(BUILTINS)}) or 'package.module:attribute'")
    path = BUILTINS.get(spec, spec)
    if ":" not in path:
        raise ConfigError(f"workload = {spec!r} is neither a built-in ({', '.join(BUILTINS)}) nor an "
                         "import path; write it as 'package.module:attribute'")
    module_name, attr = path.split(":", 1)
    if not module_name or module_name.startswith(".") or not attr:
        raise ConfigError(f"workload = {spec!r} is not a whole import path; write it as "
                         "'package.module:attribute' (absolute, both parts named)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"workload = {spec!r}: module {module_name!r} could not be imported ({e}); "
                         "check the name and that it is on PYTHONPATH") from None
    if not hasattr(module, attr):
        raise ConfigError(f"workload = {spec!r}: module {module_name!r} has no attribute {attr!r}")
    obj = getattr(module, attr)
    if callable(obj) and not isinstance(obj, Workload):
        obj = _from_factory(spec, attr, obj)
    if not isinstance(obj, Workload):
        raise ConfigError(f"workload = {spec!r}: {attr} is a {type(obj).__name__}, not a "
                         "relay.Workload (or a function returning one)")
    return obj


def _from_factory(spec: str, attr: str, factory: Callable):
    """What a workload factory returns, called with no arguments; one that needs arguments is
    refused without being called (an import path can name any function, os:system say)."""
    try:
        inspect.signature(factory).bind()
    except TypeError as e:
        raise ConfigError(f"workload = {spec!r}: {attr} cannot be called with no arguments ({e}); name a "
                         "Workload or a function of no arguments that returns one") from None
    except ValueError:
        pass  # no signature to read (some built-ins): calling it tells
    return factory()


__all__ = ["Workload", "get", "shard", "Iterator"]
