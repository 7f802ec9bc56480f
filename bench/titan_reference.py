"""torchtitan 0.3.0 under plain torchrun on this CPU host (gloo): the reference that Relay's runs of
torchtitan are compared with (README "Run a GPU training program unmodified"; bench/titan_runs.py).

torchtitan cannot run on a CPU host as it ships (it picks "cuda" and stops at set_device); the
smallest harness patch that lets it, applied here before torchtitan is imported:
  1. the device is the host: torch._utils._get_available_device_type() answers "cpu", so
     torchtitan's device module is torch.cpu and its process group is gloo;
  2. its memory monitor asks torch.cpu for a device name, properties and memory statistics that
     torch.cpu lacks: a name, the host's memory and empty statistics (its memory line reads -1);
     and barrier(device_ids=[current_device()]) needs an index where torch.cpu answers "cpu": 0;
  3. the library patches Relay's virtual device applies to every program
     (relay.device.backend.gpu_libs: torch.compile eager, FlexAttention's host backward,
     torch.distributed.set_timeout and a pipeline schedule's pre-split step(arg_mbs=...) where
     this torch lacks them), so both sides compute alike;
  4. gloo has no ReduceOp.PREMUL_SUM, which FSDP2 reduce-scatters gradients with (torchtitan sets
     its divide factor to 1.0: PREMUL_SUM(1.0)): FSDP2 is asked for its sum-then-divide path
     (force_sum_reduction_for_comms), a SUM and a division by 1.0.

Usage: torchrun --nproc-per-node N bench/titan_reference.py <torchtitan's own arguments>
"""

import os
import sys
from types import SimpleNamespace

import torch
import torch._utils
from torch.distributed.fsdp._fully_shard import _fsdp_collectives

from relay.device.backend import gpu_libs

torch._utils._get_available_device_type = lambda: "cpu"
torch.cpu.get_device_name = lambda device=None: "host CPU"
_pages = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
torch.cpu.get_device_properties = lambda device=None: SimpleNamespace(total_memory=_pages)
torch.cpu.reset_peak_memory_stats = lambda device=None: None
torch.cpu.empty_cache = lambda: None
torch.cpu.current_device = lambda: 0
torch.cpu.memory_stats = lambda device=None: {}
for obj, name, value in gpu_libs.patches():
    setattr(obj, name, value)
_factors = _fsdp_collectives._get_gradient_divide_factors
_fsdp_collectives._get_gradient_divide_factors = lambda group, ar_group, dtype, device_type="", factor=None, *_: \
    _factors(group, ar_group, dtype, device_type, factor, True)

if __name__ == "__main__":
    from torchtitan.train import main
    sys.exit(main())
