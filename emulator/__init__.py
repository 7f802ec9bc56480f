"""Relay: emulate many accelerators with real processes, and measure what they would do.

The public API; the layers below it, from the bottom: hardware (chips, systems), kernels/ (cost
model, clocks, throttle), collectives, workloads and the training definition (trainer), device
side (worker, transport, device jobs), driver side (Cluster, monitor, experiments), results.
docs/design.md maps every module."""

from relay.device.job import Faults
from relay.driver.cluster import Cluster
from relay.driver.metrics import TrainResult
from relay.driver.monitor import DeviceError
from relay.hardware import chips
from relay.hardware.system import System
from relay.parallel import Parallel
from relay.trainer import TrainConfig, train_single
from relay.workloads import Workload

__all__ = ["Cluster", "DeviceError", "Faults", "Parallel", "System", "TrainConfig", "TrainResult", "Workload", "chips",
           "train_single"]
