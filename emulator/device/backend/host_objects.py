"""What takes a device besides tensors, kept on the host while a program sees the virtual CUDA
device (backend/cuda.py installs `patches()`; docs/design.md "Programs written for GPUs"):
a DeviceMesh of device type "cuda" is a host mesh (FSDP2 and DTensor find their parameters on
the mesh's device), DDP's `device_ids` of a host module are dropped, FSDP1's `device_id` is the
host's, `torch.autocast("cuda", dtype)` is the host's autocast of that dtype, `torch.load`'s
`map_location`, `torch.set_default_device` and `torch.Generator` of "cuda" are the host,
`torch.is_autocast_enabled("cuda")` / `get_autocast_dtype("cuda")` read the host's autocast,
`nccl` is available (it is the relay backend), and NVTX ranges do nothing (as without a
profiler attached)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def _cuda(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    return isinstance(d, str) and (d == "cuda" or d.startswith("cuda:"))


def _index(d) -> bool:
    return isinstance(d, int) and not isinstance(d, bool)


def _no_range(*args, **kwargs):
    return 0


@contextlib.contextmanager
def _range(*args, **kwargs):
    yield


NVTX = {"range_push": _no_range, "range_pop": _no_range, "mark": _no_range, "range_start": _no_range,
        "range_end": _no_range, "range": _range}


def autocast_init(original):
    def __init__(self, device_type, dtype=None, *args, **kwargs):
        if device_type == "cuda":  # the host's autocast, same dtype (CUDA's default: float16)
            device_type, dtype = "cpu", torch.float16 if dtype is None else dtype
        return original(self, device_type, dtype, *args, **kwargs)
    return __init__


def mesh_init(original):
    def __init__(self, device_type, *args, **kwargs):  # a "cuda" mesh is the host's (FSDP2, DTensor)
        return original(self, "cpu" if device_type == "cuda" else device_type, *args, **kwargs)
    return __init__


def fsdp1_init(original):
    def __init__(self, module, *args, device_id=None, **kwargs):  # FSDP1 on the host's device
        if _cuda(device_id) or _index(device_id):
            device_id = torch.device("cpu")
        return original(self, module, *args, device_id=device_id, **kwargs)
    return __init__


def ddp_init(original):
    def __init__(self, module, device_ids=None, output_device=None, *args, **kwargs):
        if all(p.device.type == "cpu" for p in module.parameters()):  # a host module: no device ids
            device_ids = output_device = None
        return original(self, module, device_ids, output_device, *args, **kwargs)
    return __init__


def _host_location(location):
    if _cuda(location) or _index(location):
        return "cpu"
    if isinstance(location, dict):  # {"cuda:1": "cuda:0"}: every target on the host
        return {k: _host_location(v) for k, v in location.items()}
    return location


def load(original):
    def load(f, map_location=None, *args, **kwargs):  # a checkpoint loaded "to the GPU" is on the host
        return original(f, _host_location(map_location), *args, **kwargs)
    return load


def set_default_device(original):
    def set_default_device(device):
        return original("cpu" if _cuda(device) or _index(device) else device)
    return set_default_device


class Generator(torch._C.Generator):
    """torch.Generator(device="cuda"): a generator of the host (the program's tensors are there)."""

    def __new__(cls, device=None):
        return super().__new__(cls, "cpu" if device is None or _cuda(device) or _index(device) else device)

    def __init__(self, device=None) -> None:
        pass


def autocast_query(original):
    def query(device_type="cuda", *args):  # torch.is_autocast_enabled("cuda"): the host's autocast
        return original("cpu" if device_type == "cuda" else device_type, *args)
    return query


def patches() -> list:
    """(object, name, value) for backend/cuda.py's `emulated`."""
    from torch.amp import autocast_mode
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel
    return [(torch.cuda.nvtx, name, value) for name, value in NVTX.items()] + [
        (dist, "is_nccl_available", lambda: True),
        (autocast_mode.autocast, "__init__", autocast_init(autocast_mode.autocast.__init__)),
        (DistributedDataParallel, "__init__", ddp_init(DistributedDataParallel.__init__)),
        (DeviceMesh, "__init__", mesh_init(DeviceMesh.__init__)),
        (FullyShardedDataParallel, "__init__", fsdp1_init(FullyShardedDataParallel.__init__)),
        (torch, "load", load(torch.load)), (torch, "Generator", Generator),
        (torch, "is_autocast_enabled", autocast_query(torch.is_autocast_enabled)),
        (torch, "get_autocast_dtype", autocast_query(torch.get_autocast_dtype)),
        (torch, "set_default_device", set_default_device(torch.set_default_device))]
