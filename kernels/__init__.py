"""Per-op cost model, clocks, throttle and host calibration: what one emulated device's compute costs."""

from kernels.clock import VirtualLane, WallLane, make_lane
from kernels.cost import CostModel, OpCost
from kernels.throttle import Throttle, throttled_matmul

__all__ = ["CostModel", "OpCost", "Throttle", "VirtualLane", "WallLane", "make_lane", "throttled_matmul"]
