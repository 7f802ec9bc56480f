"""The virtual CUDA device: a program written for GPUs runs unmodified on a Relay device
(docs/design.md "Programs written for GPUs": the choice, what was tried, the limits).

While a program runs (`emulated(...)`, entered by program.py on the virtual clock):

* `torch.cuda`'s device calls answer for the emulated chip: `is_available()` is True,
  `device_count()` is the devices of this device's scale-up domain (torchrun's LOCAL_WORLD_SIZE:
  programs call `set_device(LOCAL_RANK)`), `get_device_name/properties/capability` name the chip,
  its HBM and its SMs; `Stream`, `Event`, `stream()`, `current_stream()`, `synchronize()` are the
  device timeline's (streams.py, as torch.cpu's already are); `memory_*` read the emulated HBM
  (hbm.py), where an out-of-memory the chip would hit raises `torch.OutOfMemoryError`.
* Tensors stay on the host: `Remap`, a TorchFunctionMode on the program's thread, turns every
  "cuda" device a call names (factory functions' `device=`, `.to("cuda")`, `.to(local_rank)`,
  `.cuda()`, `torch.device("cuda", i)` passed anywhere) into "cpu", so `.device` reads cpu and
  `.is_cuda` False. Fake tensors (`--tensors fake`) are remapped alike: fake CUDA tensors
  on a CPU build of torch fail at the first slice or random init ("PyTorch is not linked with
  support for cuda devices").
* `nccl` is the `relay` backend (program.py takes init_process_group over; here
  `is_nccl_available()`), a DeviceMesh / init_device_mesh("cuda", ...) is a mesh of the host's
  devices (so FSDP2 and DTensor find their parameters on the mesh's device), DDP's
  `device_ids` / `output_device` of a host module are dropped, FSDP1's `device_id` is the host,
  and `torch.autocast("cuda", ...)` (and torch.cuda.amp's) is the CPU autocast of the same dtype.
* What cannot be emulated is refused by name (`Unsupported`): CUDA graphs, raw CUDA kernels.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from types import FunctionType

import torch
from torch.overrides import TorchFunctionMode

from relay.device.backend import gpu_libs, host_objects, streams
from relay.device.backend import hbm as hbm_names
from relay.device.backend.host_objects import _cuda, _index

# compute capability reported per chip (NVIDIA's CUDA GPUs table); chips that are not NVIDIA's
# report (8, 0), the lowest with bf16, so that programs take the paths they take on an A100
CAPABILITY = {"a100": (8, 0), "h100": (9, 0), "h100-hbm2e": (9, 0), "h200": (9, 0), "b200": (10, 0),
              "b200-hgx": (10, 0), "gb200": (10, 0)}
DEFAULT_CAPABILITY = (8, 0)


class Unsupported(RuntimeError):
    """A CUDA call Relay's virtual device cannot emulate."""


@dataclass(frozen=True)
class Properties:
    """torch.cuda.get_device_properties(): the emulated chip's."""
    name: str
    total_memory: int  # bytes: the chip's HBM
    multi_processor_count: int
    major: int
    minor: int
    is_integrated: bool = False
    is_multi_gpu_board: bool = False
    L2_cache_size: int = 50 * 2 ** 20  # bytes, an estimate (H100 SXM: 50 MB)
    warp_size: int = 32
    gcnArchName: str = ""
    uuid: str = "relay-emulated"

    def __repr__(self) -> str:
        return (f"_CudaDeviceProperties(name='{self.name}', major={self.major}, minor={self.minor}, "
                f"total_memory={self.total_memory // 2 ** 20}MB, "
                f"multi_processor_count={self.multi_processor_count}) (relay: emulated)")


def _host(d):
    return "cpu" if _cuda(d) else d


_TO = {torch.Tensor.to, torch._C._nn._parse_to}  # (Module.to parses its arguments with _parse_to)
_SELF = {torch.Tensor.cuda, torch.Tensor.pin_memory}  # the tensor itself (it is on the host already)


class Remap(TorchFunctionMode):
    """Every "cuda" device a call names becomes the host's (see the module's docstring)."""

    def __init__(self):
        super().__init__()
        self.local = threading.local()  # .inside: the functions in Python this thread is redispatching

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.device:  # (a device object is made through torch function too: it stays cuda;
            if len(args) == 1 and isinstance(args[0], int) and not kwargs:  # torch.device(i): the accelerator's
                return torch.device("cuda", args[0])
            return func(*args, **kwargs)
        if func in _SELF:
            return args[0]
        if func is torch.Tensor.type and args[1:2] and isinstance(args[1], str) and args[1].startswith("torch.cuda."):
            args = (args[0], "torch." + args[1][len("torch.cuda."):], *args[2:])  # x.type("torch.cuda.FloatTensor")
        if "device" in kwargs:
            d = kwargs["device"]
            if _cuda(d) or _index(d):  # device=local_rank: the accelerator's, as on a GPU build
                kwargs = {**kwargs, "device": "cpu"}
        if func in _TO and any(isinstance(a, int) and not isinstance(a, bool) for a in args):
            args = tuple("cpu" if isinstance(a, int) and not isinstance(a, bool) else _host(a)
                         for a in args)  # .to(local_rank)
        elif any(_cuda(a) for a in args):
            args = tuple(_host(a) for a in args)
        inside = self.local.__dict__.setdefault("inside", set())
        if isinstance(func, FunctionType) and func not in inside:  # a function in Python (Tensor.backward,
            inside.add(func)  # nn.init.*): what it runs inside (a backward pass and FSDP's hooks in it,
            try:  # DTensor's dispatch) is remapped too; its own C++ half (Tensor.unflatten's super()) asks
                with self:  # again under the same name and is called as is
                    return torch.overrides.redispatch_function(func, types, args, kwargs)
            finally:
                inside.discard(func)
        return func(*args, **kwargs)


class VirtualCuda:
    """torch.cuda's answers for one device (installed by `emulated`)."""

    def __init__(self, chip, count: int, index: int, hbm) -> None:
        self.chip, self.count, self.index, self.hbm = chip, count, index, hbm
        major, minor = CAPABILITY.get(chip.name, DEFAULT_CAPABILITY)
        self.properties = Properties(name=chip.display or chip.name, total_memory=hbm.capacity,
                                     multi_processor_count=chip.compute_units or 132, major=major,
                                     minor=minor)

    def _ordinal(self, device) -> int:
        if device is None:
            return self.index
        if isinstance(device, str):
            device = torch.device(device)
        if isinstance(device, torch.device):
            if device.type == "cpu":  # a tensor's own device (remapped: it reads cpu) is the current one
                return self.index
            if device.type != "cuda":
                raise ValueError(f"Expected a cuda device, but got: {device}")
            device = self.index if device.index is None else device.index
        if not 0 <= int(device) < self.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal {device} (relay: the emulated node has "
                               f"{self.count} devices: torch.cuda.device_count())")
        return int(device)

    # ------------------------------------------------------------ devices
    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def init(self) -> None:
        pass

    def device_count(self) -> int:
        return self.count

    def set_device(self, device) -> None:
        self.index = self._ordinal(device)

    def current_device(self) -> int:
        return self.index

    def get_device_name(self, device=None) -> str:
        self._ordinal(device)
        return self.properties.name

    def get_device_properties(self, device=None) -> Properties:
        self._ordinal(device)
        return self.properties

    def get_device_capability(self, device=None) -> tuple:
        self._ordinal(device)
        return self.properties.major, self.properties.minor

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        return True

    def get_arch_list(self) -> list:
        return [f"sm_{self.properties.major}{self.properties.minor}"]


    # ------------------------------------------------------------ random numbers: the host's generator
    # (torch.default_generator itself: torch.manual_seed / torch.seed call torch.cuda.manual_seed_all /
    # seed_all, which would call back into them without end)
    def manual_seed(self, seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    def manual_seed_all(self, seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    def seed(self) -> None:
        torch.default_generator.seed()

    def seed_all(self) -> None:
        torch.default_generator.seed()

    def get_rng_state(self, device=None):
        return torch.get_rng_state()

    def set_rng_state(self, state, device=None) -> None:
        torch.set_rng_state(state)

    def initial_seed(self) -> int:
        return torch.initial_seed()

    def ipc_collect(self) -> None:
        pass

    def is_current_stream_capturing(self) -> bool:
        return False  # (no CUDA graph is ever captured: they are refused)

    def memory_summary(self, device=None, abbreviated: bool = False) -> str:
        """torch.cuda.memory_summary(): the emulated HBM's figures (torch's table needs its
        allocator's per-pool statistics, which the emulated HBM does not keep)."""
        self._ordinal(device)
        h, mib = self.hbm, 2 ** 20
        return (f"relay: emulated HBM of device {self.index} ({self.properties.name}, "
                f"{h.capacity / 1e9:.0f} GB): allocated {h.allocated / mib:.1f} MiB "
                f"(peak {h.peak / mib:.1f} MiB), reserved {h.reserved / mib:.1f} MiB")

    def set_stream(self, stream) -> None:
        """torch.cuda.set_stream(s): s is the current stream from here on (the emulated timeline's)."""
        if streams._active is not None:
            streams._apply("use", stream.id)

    def default_stream(self, device=None):
        return torch.cpu.current_stream() if streams._active is None else streams._DEFAULT


class _DeviceContext:
    """torch.cuda.device(i): the current device inside, restored after (a class: torch's own code
    tests isinstance(x, torch.cuda.device)); `emulated` makes one per device (`cuda`)."""
    cuda: VirtualCuda

    def __init__(self, device) -> None:
        self.target = device
        self.idx = -1 if device is None or (_index(device) and device < 0) else self.cuda._ordinal(device)

    def __enter__(self):
        self.previous = self.cuda.index
        if self.idx >= 0:
            self.cuda.set_device(self.idx)
        return self

    def __exit__(self, *exc) -> None:
        self.cuda.index = self.previous


def _refuse(name: str, why: str):
    """A class (annotations such as `torch.cuda.CUDAGraph | None` still work) that refuses to be made."""
    def __init__(self, *args, **kwargs):
        raise Unsupported(f"torch.cuda.{name} cannot run on Relay's virtual CUDA device: {why} "
                          "(docs/design.md 'Programs written for GPUs')")
    return type(name, (), {"__init__": __init__, "__module__": __name__})


_REFUSED = {
    "CUDAGraph": "CUDA graphs capture real kernels; run the program without them (e.g. no cudagraphs / "
                 "reduce-overhead compile mode)",
    "graph": "CUDA graphs capture real kernels; run the program without them",
    "make_graphed_callables": "CUDA graphs capture real kernels; run the program without them",
    "graph_pool_handle": "CUDA graphs capture real kernels; run the program without them (torchtitan: "
                         "--training.disable_cuda_graphs)",
    "jiterator": "custom CUDA kernels have no host equivalent; use the aten op it replaces",
    "caching_allocator_alloc": "raw device allocations have no host equivalent",
}
_DEVICE_NAMES = ("is_available", "is_initialized", "init", "device_count", "set_device", "current_device",
                 "get_device_name", "get_device_properties", "get_device_capability", "is_bf16_supported",
                 "get_arch_list", "manual_seed", "manual_seed_all", "seed", "seed_all",
                 "get_rng_state", "set_rng_state", "initial_seed", "default_stream", "ipc_collect",
                 "is_current_stream_capturing", "memory_summary", "set_stream")
_MEMORY_NAMES = hbm_names.CUDA_NAMES  # (the Hbm's methods)


@contextlib.contextmanager
def _patched(patches):
    """(object, name, value) patches applied inside, undone after."""
    saved = [(obj, name, getattr(obj, name, _MISSING)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


_MISSING = object()


def count_from_env() -> int:
    """Devices of this device's node: torchrun's LOCAL_WORLD_SIZE (program.py sets it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


@contextlib.contextmanager
def emulated(chip, hbm, *, count: int | None = None, index: int | None = None):
    """While inside, this thread's program sees a CUDA device: the emulated `chip` with `hbm`
    (an hbm.Hbm the throttle counts into). Streams need streams.emulated(...) around it."""
    count = count_from_env() if count is None else count
    index = int(os.environ.get("LOCAL_RANK", "0")) % count if index is None else index
    cuda = VirtualCuda(chip, count, index, hbm)
    patches = [(torch.cuda, name, getattr(cuda, name)) for name in _DEVICE_NAMES]
    patches.append((torch.cuda, "device", type("device", (_DeviceContext,), {"cuda": cuda})))
    patches += [(module, name, getattr(hbm, name))
                for name in _MEMORY_NAMES for module in (torch.cuda, torch.cuda.memory)] + hbm.patches()
    patches.append((torch.cuda.memory, "memory_summary", cuda.memory_summary))
    # the device timeline's streams where streams.emulated is active (virtual clock), else torch.cpu's no-ops
    patches += [(torch.cuda, name, getattr(torch.cpu, name)) for name in streams.NAMES]
    if streams._active is None:  # the wall clock: events on the host's time (streams.HostEvent)
        patches += [(torch.cuda, "Event", streams.HostEvent), (torch.cuda, "Stream", streams.HostStream)]
    patches += [(torch.cuda, name, _refuse(name, why)) for name, why in _REFUSED.items()]
    patches += host_objects.patches()  # nccl, autocast, DDP, DeviceMesh, FSDP1, nvtx, load, default device
    patches += gpu_libs.patches()  # torch.compile, FlexAttention, DTensor's RNG (backend/gpu_libs.py)
    with _patched(patches), Remap():
        yield cuda
