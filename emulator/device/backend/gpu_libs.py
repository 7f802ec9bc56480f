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
* A pipeline schedule's `step(arg_mbs=, kwarg_mbs=, target_mbs=)` (micro-batches split by the
  caller, torch 2.14's form; torchtitan 0.3.0's only pipeline call) where this torch's `step` takes
  the whole batch only: the same body as torch 2.14's, which checks the pre-split lists and runs
  them through the schedule's own `_step_microbatches`; a whole-batch call runs this torch's `step`.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch.distributed.pipelining import schedules

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


def _pre_split(step):
    """A schedule class's `step` that also takes the micro-batches split (torch 2.14's arguments)."""
    def pre_split_step(self, *args, target=None, losses=None, return_outputs=True, loss_kwargs=None,
                       arg_mbs=None, kwarg_mbs=None, target_mbs=None, **kwargs):
        if arg_mbs is None and kwarg_mbs is None and target_mbs is None:
            return step(self, *args, target=target, losses=losses, return_outputs=return_outputs,
                        loss_kwargs=loss_kwargs, **kwargs)
        if args or kwargs or target is not None:
            raise ValueError("with pre-split inputs (arg_mbs, kwarg_mbs, target_mbs) pass no whole-batch "
                             f"inputs: got args={len(args)}, kwargs={sorted(kwargs)}, target={target is not None}")
        if self._has_backward and getattr(self, "_backward_requires_autograd", True) and not torch.is_grad_enabled():
            raise RuntimeError("step() requires gradients to be enabled for backward computation; "
                               "it should not be used under torch.no_grad() context. Please call eval() instead.")
        stages = getattr(self, "_stages", None) or [self._stage]
        for stage in stages:
            stage.has_backward = self._has_backward
            stage.clear_runtime_states()
        arg_mbs, kwarg_mbs = self._check_inputs(arg_mbs, kwarg_mbs, target_mbs, losses)
        for i, (arg_mb, kwarg_mb) in enumerate(zip(arg_mbs, kwarg_mbs, strict=True)):
            if not isinstance(arg_mb, tuple) or not isinstance(kwarg_mb, dict):
                raise TypeError(f"arg_mbs must be a list of tuples and kwarg_mbs a list of dicts; micro-batch {i} "
                                f"has {type(arg_mb).__name__} / {type(kwarg_mb).__name__}")
        self._step_microbatches(arg_mbs, kwarg_mbs, target_mbs, losses, return_outputs, loss_kwargs=loss_kwargs)
        last = [s for s in stages if s.is_last]
        return self._merge_outputs(last[0].output_chunks) if last and return_outputs else None
    return pre_split_step


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
    for cls in (schedules.PipelineScheduleSingle, schedules.PipelineScheduleMulti):
        if "arg_mbs" not in inspect.signature(cls.step).parameters:
            found.append((cls, "step", _pre_split(cls.step)))
    return found
