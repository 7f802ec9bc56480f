"""The emulated chip's HBM as a program's `torch.cuda.memory_*` calls see it (the virtual CUDA
device, backend/cuda.py; docs/design.md "Programs written for GPUs").

Every tensor storage an op makes while the program runs (the throttle sees every op) is counted
once, rounded up to 512 bytes as CUDA's caching allocator rounds blocks, and uncounted when the
storage is freed (a weak reference's finalizer). Real and fake tensors count alike, by their
real size, so a fake run at full size holds the model's real footprint. A wrapper subclass (a
DTensor) counts its inner tensors (a DTensor's local shard), not its own storage (the global size,
no memory). A storage resized in place (`UntypedStorage.resize_`: FSDP2 frees and allocates its
all-gathered parameters so) is counted at its new size. A storage that would take the count past
the chip's capacity raises `torch.OutOfMemoryError` naming the chip, as PyTorch's allocator does
(the op has run on the host; its output is dropped).

`reserved` follows the caching allocator's rule (memory once held stays held until
`empty_cache()`): the peak allocated since the last `empty_cache`. Storages made before the
program started (none, for a script) and the communication engine's own buffers (off the
program's thread) are not counted.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

BLOCK = 512  # bytes: CUDA's caching allocator rounds every block up to a multiple of 512
_GIB = 2 ** 30


class Hbm:
    """A device's HBM: what the program's live storages hold, against the chip's capacity."""

    def __init__(self, chip) -> None:
        self.chip = chip
        self.capacity = int(chip.hbm_gb * 1e9)  # bytes (the catalog's GB are 1e9 bytes)
        self.fraction = 1.0  # torch.cuda.set_per_process_memory_fraction's limit
        self.live: dict[int, int] = {}  # storage key -> bytes counted
        self.allocated = 0
        self.peak = 0
        self.reserved = 0
        self.allocations = 0
        self.frees = 0

    def track(self, out) -> None:
        """Count the storages of an op's output (a tensor, or tensors in a list or tuple)."""
        if isinstance(out, torch.Tensor):
            self._tensor(out)
        elif isinstance(out, (list, tuple)):
            for t in out:
                if isinstance(t, torch.Tensor):
                    self._tensor(t)

    def _tensor(self, t: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(t):
            # a wrapper (a DTensor, FSDP2's parameters, an AsyncCollectiveTensor) holds its inner
            # tensors' memory (a DTensor: its local shard), made by ops below the throttle that it
            # never sees; the wrapper's own storage has the global size and no memory
            for name in t.__tensor_flatten__()[0]:
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):  # (a DTensor also names its mesh)
                    self._tensor(inner)
        else:
            self._storage(t)

    def patches(self) -> list:
        """(object, name, value) patches while the program runs: a counted storage resized in
        place (`UntypedStorage.resize_`, no aten op: FSDP2 frees each all-gathered parameter so
        after its forward and backward, and allocates it again before) is counted at its new size."""
        resize = torch.UntypedStorage.resize_

        def resize_(storage, size):
            self._resize(storage._cdata, size)
            return resize(storage, size)
        return [(torch.UntypedStorage, "resize_", resize_)]

    def _resize(self, key: int, size: int) -> None:
        if key not in self.live:  # (not the program's: made before it, or by the engine)
            return
        nbytes = -(-int(size) // BLOCK) * BLOCK
        self._check(nbytes - self.live[key])
        self.allocated += nbytes - self.live[key]
        self.live[key] = nbytes
        self.peak = max(self.peak, self.allocated)
        self.reserved = max(self.reserved, self.allocated)

    def _check(self, nbytes: int) -> None:
        if self.allocated + nbytes > self.capacity * self.fraction:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory on the emulated {self.chip.display or self.chip.name} "
                f"({self.chip.hbm_gb:g} GB HBM): tried to allocate {nbytes / _GIB:.2f} GiB with "
                f"{self.allocated / _GIB:.2f} GiB allocated of {self.capacity / _GIB:.2f} GiB"
                + (f", {self.fraction:g} of it allowed " if self.fraction < 1 else " ") +
                "(relay: emulated HBM, docs/design.md 'Programs written for GPUs')")

    def _storage(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":  # (no memory: a model built on "meta" before it is sharded, as torchtitan's)
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a subclass without storage
            return
        key = storage._cdata
        if key in self.live:
            return
        nbytes = -(-storage.nbytes() // BLOCK) * BLOCK
        self._check(nbytes)
        self.live[key] = nbytes
        self.allocated += nbytes
        self.allocations += 1
        self.peak = max(self.peak, self.allocated)
        self.reserved = max(self.reserved, self.allocated)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        nbytes = self.live.pop(key, 0)
        self.allocated -= nbytes
        self.frees += 1

    # ------------------------------------------------------------ torch.cuda's names (CUDA_NAMES)
    def memory_allocated(self, device=None) -> int:
        return self.allocated

    def max_memory_allocated(self, device=None) -> int:
        return self.peak

    def memory_reserved(self, device=None) -> int:
        return self.reserved

    def max_memory_reserved(self, device=None) -> int:
        return self.reserved

    def mem_get_info(self, device=None) -> tuple:
        return self.capacity - self.reserved, self.capacity

    def reset_peak_memory_stats(self, device=None) -> None:
        self.peak = self.allocated

    def reset_max_memory_allocated(self, device=None) -> None:
        self.peak = self.allocated

    def reset_accumulated_memory_stats(self, device=None) -> None:
        pass

    def empty_cache(self) -> None:
        self.reserved = self.allocated

    def set_per_process_memory_fraction(self, fraction: float, device=None) -> None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        self.fraction = fraction  # the allocator's limit: an allocation past it is out of memory

    def get_per_process_memory_fraction(self, device=None) -> float:
        return self.fraction

    def memory_stats(self, device=None) -> dict:
        """torch.cuda.memory_stats()'s keys that programs read (all pools as one)."""
        return {"allocated_bytes.all.current": self.allocated, "allocated_bytes.all.peak": self.peak,
                "reserved_bytes.all.current": self.reserved, "reserved_bytes.all.peak": self.reserved,
                "active_bytes.all.current": self.allocated, "active_bytes.all.peak": self.peak,
                "allocation.all.current": len(self.live), "num_alloc_retries": 0, "num_ooms": 0,
                "num_device_alloc": self.allocations, "num_device_free": self.frees}


# the methods above, by the torch.cuda names they answer (backend/cuda.py installs them)
CUDA_NAMES = ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved",
              "mem_get_info", "reset_peak_memory_stats", "reset_max_memory_allocated",
              "reset_accumulated_memory_stats", "empty_cache", "set_per_process_memory_fraction",
              "get_per_process_memory_fraction", "memory_stats")
