"""One emulated accelerator: a Ray actor running real PyTorch under the throttle.

The actor is generic: each call brings a `Job` (the system, clock and cost settings of that
run), so one set of actors serves a whole sweep of chips and device counts.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass, field, replace

import ray
import torch

from emulator.collectives.alltoall import layout_for
from emulator.collectives.core import Ports, finish, link_function, prepare
from emulator.collectives.schedules import schedule
from emulator.system import System
from kernels.clock import make_lane
from kernels.cost import CostModel
from kernels.throttle import Throttle


@dataclass(frozen=True)
class Faults:
    """Faults injected on purpose, for experiments and tests."""
    fail: tuple[int, int] | None = None  # (device, step): that device's process dies at that step
    #                                      (a training step, or a collective's schedule step)
    compute_slowdown: dict = field(default_factory=dict)  # device -> factor on every op's cost
    link_slowdown: dict = field(default_factory=dict)  # device -> factor on its links' time

    def check(self, devices: int) -> None:
        for what, d in ([("fail", self.fail[0])] if self.fail else []) + \
                [("straggler", d) for d in (*self.compute_slowdown, *self.link_slowdown)]:
            if not (isinstance(d, int) and 0 <= d < devices):
                raise ValueError(f"{what}: device = {d!r} is not a device; give 0..{devices - 1}")
        if self.fail and not (isinstance(self.fail[1], int) and self.fail[1] >= 0):
            raise ValueError(f"fail: step = {self.fail[1]!r} is invalid; give a step >= 0")
        for d, x in (*self.compute_slowdown.items(), *self.link_slowdown.items()):
            if not (isinstance(x, (int, float)) and x >= 1):
                raise ValueError(f"straggler: slowdown = {x!r} for device {d} is invalid; give a factor >= 1")

    def fails_here(self, device: int, step: int) -> bool:
        return self.fail is not None and self.fail == (device, step)


@dataclass(frozen=True)
class Job:
    """What every device of one run needs to know; sent with each call."""
    system: System
    clock: str = "virtual"  # "virtual" | "wall"
    dilation: float | None = None  # wall clock: real seconds per emulated second
    epoch: float | None = None  # wall clock: real time (time.time()) of emulated 0, shared
    dtype: str = "bf16"  # emulated dtype of floating tensors
    efficiency: dict = field(default_factory=dict)  # matmul_eff, mem_eff, launch_us overrides
    timeout_s: float = 30.0  # how long a device waits for a peer before failing
    faults: Faults = field(default_factory=Faults)

    def lane(self):
        return make_lane(self.clock, self.dilation, self.epoch)

    def cost_model(self, rank: int = 0) -> CostModel:
        return CostModel(self.system.chip_of(rank), self.dtype, **self.efficiency)

    def throttle(self, rank: int, lane, device: str = "cpu") -> Throttle:
        return Throttle(self.cost_model(rank), lane, sync_cuda=device == "cuda" and self.clock == "wall",
                        slowdown=self.faults.compute_slowdown.get(rank, 1.0))

    def links(self):
        """(i, j) -> (class, Link), with any straggler's links slowed down."""
        return link_function(self.system, self.faults.link_slowdown)


def die() -> None:
    """An injected failure: this device's process ends at once, as a crash would end it."""
    os.kill(os.getpid(), signal.SIGKILL)


class DeviceActor:
    def __init__(self, index: int, device: str = "cpu"):
        torch.set_num_threads(1)
        self.index = index
        self.device = device
        self.transport = None
        self.rows: list[dict] = []  # training progress

    # ---------------------------------------------------------------- control
    def ready(self) -> dict:
        return {"pid": os.getpid(), "node_ip": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}

    def ping(self) -> bool:
        return True

    def progress(self) -> list[dict]:
        """Rows of the training steps done so far (answered while train() runs)."""
        return list(self.rows)

    def free_address(self, host: str) -> tuple[str, int]:
        from emulator.transport import free_address
        return free_address(host)

    def connect(self, addr: str, port: int, world: int, timeout_s: float) -> bool:
        from emulator.transport import Transport
        self.disconnect()
        self.transport = Transport(self.index, world, addr, port, timeout_s)
        return True

    def disconnect(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    # ---------------------------------------------------------------- compute
    def run_matmuls(self, job: Job, sizes: list[int], repeats: list[int]) -> dict:
        """Square matmuls of the given sizes under the throttle; per-size and total figures."""
        gen = torch.Generator().manual_seed(self.index)
        mats = {n: (torch.randn(n, n, generator=gen).to(self.device),
                    torch.randn(n, n, generator=gen).to(self.device)) for n in set(sizes)}
        lane = job.lane()
        throttle = job.throttle(self.index, lane, self.device)
        per_size = []
        lane.start()
        t_start, r_start = lane.measure(), time.time()
        with throttle:
            for n, reps in zip(sizes, repeats):
                with throttle.pause():
                    t0, r0, c0, f0 = lane.measure(), time.time(), throttle.emulated_s, throttle.flops
                a, b = mats[n]
                for _ in range(reps):
                    torch.mm(a, b)
                with throttle.pause():
                    t1 = lane.measure()
                per_size.append({"size": n, "repeats": reps, "emulated_s": t1 - t0,
                                 "modeled_s": throttle.emulated_s - c0, "flops": throttle.flops - f0,
                                 "real_s": time.time() - r0})
        total = lane.measure() - t_start
        stats = lane.stats()
        return {"device": self.index, "emulated_s": total, "modeled_s": throttle.emulated_s,
                "real_s": time.time() - r_start, "flops": throttle.flops, "fidelity": stats["fidelity"],
                "overrun_s": stats["overrun_s"], "overruns": stats["overruns"], "sizes": per_size}

    # ---------------------------------------------------------------- communication
    def collective(self, job: Job, primitive: str, algorithm: str, cases: list, op: str = "sum",
                   root: int = 0, repeats: int = 1) -> list[dict]:
        """Collectives among devices 0..job.system.devices-1 (this one included), one per case.
        A case is (tensor, chunks), or ((numel, dtype), chunks) for a tensor made here (benchmarks
        need not ship it)."""
        from emulator.collectives import topology_of
        world, rank = job.system.devices, self.index
        link_of = job.links()
        self.transport.barrier(world)  # start together: real_s measures the collective, not call skew
        results, stats = [], {"overrun_s": 0.0}
        for tensor, chunks in cases:
            if not isinstance(tensor, torch.Tensor):
                tensor = torch.ones(tensor[0], dtype=getattr(torch, tensor[1]))
            count = _count(primitive, tensor, world)
            steps = schedule(primitive, algorithm, rank, world, count, topology_of(job.system), root=root,
                             chunks=chunks)
            layout = layout_for(rank, world, count, topology_of(job.system), algorithm) \
                if primitive == "all_to_all" else None
            times, real = [], 0.0
            for _ in range(repeats):
                buf = prepare(primitive, rank, world, tensor.cpu(), layout)
                # every collective starts from emulated 0 on all devices at once: in wall mode at a
                # common real time agreed on now, so that no device's start-up skew enters it
                if job.clock == "wall":
                    lane = replace(job, epoch=self.transport.agree(time.time() + 0.02 + 0.002 * world,
                                                                    world)).lane()
                    lane.start()
                else:
                    lane = job.lane()
                r0 = time.time()
                fail = job.faults.fail
                self.transport.run(steps, buf, lane, Ports(), link_of, tensor.element_size(),
                                   fail_at=fail[1] if fail and fail[0] == rank else None)
                times.append(lane.measure())
                real += time.time() - r0
                stats["overrun_s"] += lane.stats()["overrun_s"]
            results.append({"output": finish(primitive, rank, world, buf, op, tensor.shape, layout).to(tensor.device),
                            "emulated_s": times, "real_s": real / repeats})
        for r in results:
            r.update(device=rank, **stats)
        return results

    # ---------------------------------------------------------------- training
    def train(self, job: Job, spec) -> dict:
        from emulator.trainer import train_device
        self.rows = []
        return train_device(self.index, job, spec, self.transport, self.device, on_step=self.rows.append)

    def launch(self, job: Job, program) -> dict:
        """A torch.distributed program on this device, on the `relay` backend (see
        emulator/backend/program.py)."""
        from emulator.backend.program import run_program
        return run_program(self.index, job, self.transport, program)

    def gloo_all_reduce(self, nbytes: int, repeats: int) -> float:
        """Real seconds per torch.distributed.all_reduce (gloo's own algorithm), for comparison."""
        x = torch.ones(nbytes // 4)
        self.transport.barrier(self.transport.world)
        t = time.time()
        for _ in range(repeats):
            self.transport.pg.allreduce([x]).wait()
        return (time.time() - t) / repeats


def _count(primitive: str, tensor: torch.Tensor, world: int) -> int:
    return tensor.numel() * (world if primitive == "all_gather" else 1)


RemoteDevice = ray.remote(DeviceActor)
