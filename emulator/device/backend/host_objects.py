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
    """Whether `d` names a CUDA device ("cuda", "cuda:i" or such a torch.device)."""
    if isinstance(d, torch.device):
        return d.type == "cuda"
    return isinstance(d, str) and (d == "cuda" or d.startswith("cuda:"))


def _index(d) -> bool:
    """Whether `d` is a device ordinal (an int, as local_rank: the accelerator's, as on a GPU build)."""
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


def _current_stream(device=None):
    from relay.device.backend import streams  # (the timeline's where one runs: --clock virtual)
    return streams.current_stream() if streams._active is not None else streams.HostStream()


def _device_module(original):
    def get_device_module(device=None):  # torch.get_device_module(): the accelerator's, torch.cuda
        return torch.cuda if device is None or _cuda(device) else original(device)
    return get_device_module


def accelerator_patches() -> list:
    """torch.accelerator agrees with torch.cuda (the current accelerator is "cuda"): torch's own
    code asks it (DataLoader's pin_memory, the optimizers' capture check, DDP, FSDP2). Pinning is
    the identity (the tensors are the host's; a DataLoader's pin thread is outside the remapping),
    and torch.utils.checkpoint's default device type stays the host's (its RNG stash is there)."""
    from torch.utils import checkpoint
    from torch.utils.data._utils import pin_memory
    acc, cuda = torch.accelerator, torch.cuda
    found = [(acc, "is_available", lambda: True),
             (acc, "current_accelerator", lambda check_available=False: torch.device("cuda")),
             (acc, "device_count", lambda: cuda.device_count()),
             (acc, "current_stream", _current_stream), (acc, "set_stream", lambda s: cuda.set_stream(s)),
             (acc, "synchronize", lambda device=None: cuda.synchronize()),
             (acc, "device_index", lambda device: cuda.device(device)),
             (acc, "get_memory_info", lambda device=None: cuda.mem_get_info()),
             (torch, "get_device_module", _device_module(torch.get_device_module)),
             (pin_memory, "pin_memory", lambda data, device=None: data),
             (checkpoint.DefaultDeviceType, "_default_device_type", "cpu")]
    for name in ("current_device_index", "current_device_idx"):
        found.append((acc, name, lambda: cuda.current_device()))
    for name in ("set_device_index", "set_device_idx"):
        found.append((acc, name, lambda device: cuda.set_device(device)))
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved",
                 "memory_stats", "reset_peak_memory_stats", "reset_accumulated_memory_stats", "empty_cache"):
        found.append((acc, name, lambda *args, _name=name, **kwargs: getattr(cuda, _name)()))
    return found


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
        (torch, "set_default_device", set_default_device(torch.set_default_device)), *accelerator_patches()]
