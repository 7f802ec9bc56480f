"""Clocks. A *lane* is one sequential stream of work on a device (compute, or communication) with
its own emulated clock, in emulated seconds since the job's epoch.

Both kinds share three operations:
    charge(cost)           the lane did `cost` emulated seconds of work
    advance_to(t)          the lane cannot go on before emulated time t (a message arrives at t)
    now()                  the lane's emulated time, for stamping a message or an event

VirtualLane only adds numbers: deterministic to the last bit, no sleeping.

WallLane paces real time: emulated time is (real time - epoch) / dilation. After each op it knows
where the schedule says it should be (`target`) and sleeps off any lead, but only once the lead
exceeds `quantum_s` of real time (sleeps are coalesced; it never busy-waits). When real time has
passed the target (the host took longer than dilation x cost), the lane is behind its schedule:
that lateness is an *overrun*, summed, and the lane carries on from the real time (it never
compresses later work to catch up). fidelity = 1 - overrun / elapsed: 1.0 means every emulated second
followed the model.
"""

from __future__ import annotations

import time


class VirtualLane:
    kind = "virtual"

    def __init__(self):
        self.t = 0.0
        self.charged_s = 0.0  # sum of charged costs

    def now(self) -> float:
        return self.t

    def scheduled(self) -> float:
        """Where the schedule has the lane now, without waiting for it (any thread may ask)."""
        return self.t

    def charge(self, cost: float) -> None:
        self.t += cost
        self.charged_s += cost

    def charge_all(self, costs) -> None:
        """Charge a recorded run of op costs: one by one, in order, so that the clock rounds
        exactly as charge() after each op would have (kernels/replay.py)."""
        t, c = self.t, self.charged_s
        for x in costs:
            t += x
            c += x
        self.t, self.charged_s = t, c

    def advance_to(self, t: float) -> None:
        if t > self.t:
            self.t = t

    def reset(self) -> None:
        self.t = 0.0

    def on_default(self) -> bool:
        """Whether the lane is the compute stream (a lane is one: see kernels/timeline.py)."""
        return True

    def start(self) -> None:
        pass

    def measure(self) -> float:
        """Emulated time for reporting (the same as now() on this clock)."""
        return self.t

    def stats(self) -> dict:
        return {"emulated_s": self.t, "charged_s": self.charged_s, "overrun_s": 0.0,
                "overruns": 0, "fidelity": 1.0}


class WallLane:
    kind = "wall"

    def __init__(self, dilation: float, epoch: float | None = None, quantum_s: float = 2e-3):
        if not dilation > 0:
            raise ValueError(f"dilation = {dilation!r} must be > 0 (real seconds per emulated second)")
        self.dilation = float(dilation)
        self.epoch = time.time() if epoch is None else float(epoch)  # real time of emulated 0
        self.quantum_s = quantum_s  # smallest real sleep worth taking; lateness below it is jitter
        self.target = 0.0  # where the schedule says this lane is, emulated s
        self.charged_s = 0.0
        self.overrun_s = 0.0  # emulated seconds the lane fell behind its schedule, in all
        self.overruns = 0  # times it fell behind by more than quantum_s of real time

    def _real(self) -> float:
        """Real time now, as emulated seconds since the epoch."""
        return (time.time() - self.epoch) / self.dilation

    def _behind(self) -> float:
        """Catch the schedule up with real time; returns the lead left (emulated s, >= 0)."""
        late = self._real() - self.target
        if late > 0:
            self.overrun_s += late
            self.overruns += late * self.dilation > self.quantum_s
            self.target += late
        return max(-late, 0.0)

    def start(self) -> None:
        """Wait for the epoch (devices start together) and begin on schedule."""
        self.advance_to(self.target)

    def charge(self, cost: float) -> None:
        self.target += cost
        self.charged_s += cost
        lead = self._behind() * self.dilation
        if lead > self.quantum_s:  # keep half a quantum of lead as a cushion for the next ops
            time.sleep(lead - self.quantum_s / 2)

    def charge_all(self, costs) -> None:
        """Charge a recorded run of op costs whose work has just run back to back: paced once,
        as charge() after its last op would (kernels/replay.py)."""
        self.charge(sum(costs))

    def advance_to(self, t: float) -> None:
        """Hold the lane until emulated time t (a sync point: sleeps off any lead). Waiting idle
        for t is not lateness; being past max(schedule, t) is."""
        if t > self.target:
            self.target = t
        lead = self._behind() * self.dilation
        if lead > 0:
            time.sleep(lead)

    def now(self) -> float:
        self.advance_to(self.target)
        return self.target

    def scheduled(self) -> float:
        """Where the schedule has the lane now, without waiting for it (any thread may ask)."""
        return self.target

    def on_default(self) -> bool:
        return True

    def measure(self) -> float:
        """Emulated time for reporting, as measured: real time since the epoch / dilation, once
        the lane has caught up with its schedule. This, not the schedule, is what wall-clock
        figures report."""
        self.now()
        return self._real()

    def stats(self) -> dict:
        elapsed = max(self._real(), self.target)
        fidelity = 1.0 - self.overrun_s / elapsed if elapsed > 0 else 1.0
        return {"emulated_s": elapsed, "charged_s": self.charged_s, "overrun_s": self.overrun_s,
                "overruns": int(self.overruns), "fidelity": fidelity}


def make_lane(clock: str, dilation: float | None = None, epoch: float | None = None):
    if clock == "virtual":
        return VirtualLane()
    if clock == "wall":
        return WallLane(dilation, epoch)
    raise ValueError(f"clock = {clock!r} is not a clock; choose 'virtual' or 'wall'")
