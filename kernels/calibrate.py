"""Host calibration: how fast this machine really is, and the dilation the wall clock needs.

The wall clock runs every emulated second as `dilation` real seconds. A device whose real work
takes r real seconds per emulated second (r = host time / emulated time, worst op of the job) is
busy r / dilation of the time; n devices sharing c cores fit in `util` of them when

    dilation >= r * max(1, n / c) / util          (util = 0.7 by default)
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass

import psutil
import torch

from relay.kernels.clock import VirtualLane
from relay.kernels.cost import CostModel
from relay.kernels.throttle import Throttle

UTIL = 0.7  # fraction of the host's cores the devices' real work may use


@dataclass(frozen=True)
class HostCalibration:
    cores: int  # CPUs this process may run on
    physical_cores: int
    memory_gb: float  # total RAM, 1e9 bytes
    available_gb: float
    matmul_gflops_per_core: float  # fp32, one thread, the slower of 256 and 512 square
    mem_gbps: float  # copy bandwidth of one thread (bytes read + written), 1e9 bytes/s
    op_overhead_us: float  # real cost of one throttled tiny op (dispatch, cost model, clock)

    def matmul_real_s(self, n: int) -> float:
        """Predicted real seconds of one n x n fp32 matmul on one core, throttled."""
        return 2.0 * n**3 / (self.matmul_gflops_per_core * 1e9) + self.op_overhead_us * 1e-6

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _ProbeChip:
    """Figures for timing the throttle's own overhead, which does not depend on them."""
    name: str = "probe"
    hbm_Bps: float = 3e12
    matmul_eff: float = 0.7
    mem_eff: float = 0.8
    launch_us: float = 4.0

    def peak_flops(self, dtype: str) -> float:
        return 1e15

    def gemm_cap(self, fp8: bool = False) -> float:
        return 1.0


_PROBE_CHIP = _ProbeChip()


def _best(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@functools.lru_cache(maxsize=1)
def calibrate() -> HostCalibration:
    """Measure this host (about half a second; cached per process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rates = []
        for n in (256, 512):
            a, b = torch.randn(n, n), torch.randn(n, n)
            rates.append(2.0 * n**3 / _best(lambda: a @ b) / 1e9)
        src = torch.empty(16 * 2**20 // 4)
        dst = torch.empty_like(src)
        mem = 2 * src.numel() * 4 / _best(lambda: dst.copy_(src)) / 1e9
        x = torch.zeros(4)
        with Throttle(CostModel(_PROBE_CHIP), VirtualLane()):
            per_op = _best(lambda: [x.add(1) for _ in range(200)]) / 200
    finally:
        torch.set_num_threads(threads)
    try:
        cores = len(psutil.Process().cpu_affinity())
    except (AttributeError, NotImplementedError):
        cores = psutil.cpu_count() or 1
    vm = psutil.virtual_memory()
    return HostCalibration(cores=cores, physical_cores=psutil.cpu_count(logical=False) or cores,
                           memory_gb=vm.total / 1e9, available_gb=vm.available / 1e9,
                           matmul_gflops_per_core=min(rates), mem_gbps=mem,
                           op_overhead_us=per_op * 1e6)


def dilation_for(ratio: float, devices: int, cores: int, util: float = UTIL) -> float:
    """Smallest dilation at which `devices` devices, each r = `ratio` real seconds per emulated
    second of work, fit in `util` of `cores` cores."""
    return ratio * max(1.0, devices / cores) / util


def check_dilation(dilation: float, needed: float, devices: int, cores: int) -> None:
    """Refuse a dilation the host cannot honour, saying which one would fit."""
    if dilation < needed:
        raise ValueError(
            f"dilation = {dilation:.4g} is too small for this host: {devices} device(s) on {cores} "
            f"core(s) need dilation >= {needed:.4g} (real seconds per emulated second) to keep up; "
            f"pass dilation=None to choose it automatically, or a value >= {needed:.4g}")
