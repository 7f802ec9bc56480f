"""Relay: emulate many accelerators with real processes, and measure what they would do.

The public API; the layers below it, from the bottom: hardware (chips, systems), kernels/ (cost
model, clocks, throttle), collectives, workloads and the training definition (trainer), device
side (worker, transport, device jobs), driver side (Cluster, monitor, experiments), results.
docs/design.md maps every module."""

from emulator.device.job import Faults
from emulator.driver.cluster import Cluster
from emulator.driver.metrics import TrainResult
from emulator.driver.monitor import DeviceError
from emulator.hardware import chips
from emulator.hardware.system import System
from emulator.parallel import Parallel
from emulator.trainer import TrainConfig, train_single
from emulator.workloads import Workload

__all__ = ["Cluster", "DeviceError", "Faults", "Parallel", "System", "TrainConfig", "TrainResult", "Workload", "chips",
           "train_single"]
