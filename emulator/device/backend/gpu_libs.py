"""What libraries that GPU programs use need on the virtual CUDA device (backend/cuda.py adds
these patches to its own while a program runs; found running torchtitan 0.3.0 as it ships):

* `torch.compile` runs the function as written (eager): every aten op then reaches the throttle
  and is charged by the cost model. Compiled kernels would bypass the dispatcher (nothing
  charged), and Dynamo, tracing with the throttle on the mode stack, traces into the throttle
  itself and stops. What the compiler would fuse is charged op by op.
* FlexAttention (torchtitan's default attention) runs its operator on the host tensors with a
  backward (relay.kernels.flex.host_patches; the throttle charges it as one fused kernel).
* DTensor's random ops draw from the host generator on each device, as DTensor on CPU does:
  its CUDA RNG tracker offsets a CUDA philox state per shard, which the host's generator does
  not have (it moved that state to the "cuda" device, outside the device remapping).
* `torch.distributed.set_timeout(timeout, group)` where this torch lacks it (torchtitan 0.3.0 is
  written against a newer torch: it shortens every group's timeout after the first step): on
  Relay's backend a collective's timeout is the launch's (`relay launch --timeout-s`), so the
  call is accepted and changes nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from relay.kernels import flex


def _eager_compile(model=None, **kwargs):
    """torch.compile on the virtual device: the function or module itself (also as a decorator)."""
    if model is None:
        return lambda fn: fn
    return model


def _no_rng_tracker(device_mesh) -> bool:
    return device_mesh.device_type not in ("cuda", "cpu") and _IS_RNG_SUPPORTED(device_mesh)


def _rng_modules():
    from torch.distributed.tensor import _dispatch, _random
    return _dispatch, _random


_IS_RNG_SUPPORTED = None


def _set_timeout(timeout, group=None) -> None:
    """torch.distributed.set_timeout on Relay's backend: the launch's timeout holds."""


def patches() -> list:
    """(object, name, value) patches, applied while a program runs on the virtual device."""
    global _IS_RNG_SUPPORTED
    dispatch, random = _rng_modules()
    if _IS_RNG_SUPPORTED is None:
        _IS_RNG_SUPPORTED = random.is_rng_supported_mesh
    found = [(torch, "compile", _eager_compile), *flex.host_patches(),
             (dispatch, "is_rng_supported_mesh", _no_rng_tracker), (random, "is_rng_supported_mesh", _no_rng_tracker)]
    if not hasattr(dist, "set_timeout"):
        found.append((dist, "set_timeout", _set_timeout))
    return found
