"""Relay: emulate many accelerators with real processes, and measure what they would do."""

from emulator import chips
from emulator.system import System

__all__ = ["Cluster", "System", "chips"]


def __getattr__(name):  # Cluster imports Ray: load it only when asked for
    if name == "Cluster":
        from emulator.cluster import Cluster
        return Cluster
    if name == "Workload":
        from emulator.workloads import Workload
        return Workload
    raise AttributeError(name)
