"""A user's torch.distributed program on one device: torchrun's environment, the `relay`
backend, the throttle on the compute lane, and the figures of the run.

`cluster.launch(fn)` runs a function with the default group already initialised; `relay launch
script.py` runs a script as `__main__`, which initialises it itself: `init_process_group` with
"gloo" or "nccl" is taken over to "relay" (said once, by device 0), and a second call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._redistribute import _gen_transform_infos

import relay.dist as relay_dist
from relay.device.backend import clock, cuda, streams
from relay.device.backend import group as relay_group
from relay.device.backend.comm_throttle import CommThrottle
from relay.device.backend.engine import Engine
from relay.device.backend.hbm import Hbm
from relay.device.backend.scripts import run_main
from relay.device.backend.steps import StepMarks
from relay.device.job import Job
from relay.kernels.timeline import Timeline


@dataclass(frozen=True)
class Program:
    """What every device runs: a function (with args) or a script (with argv)."""
    fn: object = None  # a callable, for cluster.launch
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    script: str | None = None  # a path, for relay launch
    argv: tuple = ()  # the script's arguments
    master: tuple = ("127.0.0.1", 29500)  # MASTER_ADDR, _PORT: the store device 0 serves (jobs.serve_store)
    algorithm: object = None  # None (auto), one algorithm name, or {primitive: algorithm}
    module: bool = False  # `script` names a module, run as `python -m` runs it
    log_dir: str | None = None  # a script's output goes to log_dir/rank<N>.log (device/backend/scripts.py)
    node: str | None = None  # the driver's Ray node: devices elsewhere send their output back
    cwd: str | None = None  # the driver's working directory (-m looks for the module there first)
    wrap: object = None  # a function(throttle) -> a context around the program (fake tensors: driver)
    host_clock: bool = False  # the program's time.* read the host's clock (else the emulated one)
    gpu: bool = True  # the program sees a virtual CUDA device and the emulated clock (the plan trainer: no)

    def env(self, device: int, system) -> dict:
        """torchrun's variables; a scale-up domain plays the part of a node."""
        node = system.domain_of(device)
        return {"RANK": str(device), "WORLD_SIZE": str(system.devices), "LOCAL_RANK": str(device % system.domain),
                "LOCAL_WORLD_SIZE": str(system.domain_sizes[node]), "GROUP_RANK": str(node),
                "NODE_RANK": str(node), "ROLE_RANK": str(device), "ROLE_WORLD_SIZE": str(system.devices),
                "MASTER_ADDR": self.master[0], "MASTER_PORT": str(self.master[1]),
                "TORCHELASTIC_RUN_ID": "relay", "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
                "TORCHELASTIC_USE_AGENT_STORE": "True", "OMP_NUM_THREADS": "1"}


def run_program(dev, job: Job, program: Program, *, device: int | None = None, engine_class=Engine) -> dict:
    """Run `program` on this device (a function run on the worker by driver/programs.py).
    `device` and `engine_class`: the worker plays that device of the system with that engine
    (record.py: one worker records a role's step, alone, on a store of its own)."""
    device = dev.index if device is None else device
    transport, world = dev.transport, job.system.devices
    env = program.env(device, job.system)
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if job.clock == "wall":  # emulated 0 comes once every device is here, whatever set-up took
        job = replace(job, epoch=transport.agree(time.time() + 0.1 + 0.005 * world, world))
    cost = job.cost_model(device)
    # the virtual clock runs the device as CUDA does (a host lane issuing onto streams); the wall
    # clock keeps one compute lane (its host is the real one, which cannot run ahead)
    compute = Timeline(cost.launch_us / 1e6) if job.clock == "virtual" else job.lane()
    comm = job.lane()
    engine = engine_class(device, transport, job.system, job.fabric(), compute, comm, job.timeout_s,
                          program.algorithm)
    throttle = CommThrottle(engine, cost, compute,
                            slowdown=job.faults.compute_slowdown.get(device, 1.0))
    ctx = relay_dist.Context(device, world, job.system, job.clock, engine, throttle=throttle)
    relay_group.register()
    relay_group.activate(engine)
    _forget_meshes()
    relay_dist._current = ctx
    restore = _take_over(device, world, alone=engine.recording)
    marks = StepMarks(compute, throttle, engine, ctx.counts)  # a step per optimizer.step()
    r0 = time.time()
    result = output = None
    try:
        compute.start()
        comm.start()
        with throttle, marks, _device(program, job, compute, engine, throttle):
            if program.script is None:
                store = dist.HashStore() if engine.recording else None  # (alone: no rendezvous)
                dist.init_process_group(relay_group.NAME, rank=device, world_size=world, store=store,
                                        timeout=timedelta(seconds=job.timeout_s))
                result = program.fn(*program.args, **program.kwargs)
            else:
                output = run_main(program, device)
        engine.drain()
        end = max(compute.measure(), comm.measure())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        restore()
        relay_group.activate(None)
        relay_dist._current = None
        engine.close()
        for k, v in saved_env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    stats = [compute.stats(), comm.stats()]
    return {"device": device, "result": result, "emulated_s": end, "compute_s": throttle.emulated_s,
            "comm_s": sum(e - s for _, s, e, _ in engine.spans), "exposed_comm_s": engine.exposed_s,
            "flops": throttle.flops, "spans": list(engine.spans), "counts": dict(ctx.counts),
            "steps": marks.rows(device),
            "real_s": time.time() - r0, "fidelity": min(s["fidelity"] for s in stats),
            "overrun_s": sum(s["overrun_s"] for s in stats), "output": output}


@contextlib.contextmanager
def _device(program: Program, job: Job, compute, engine, throttle):
    """The device as a program written for GPUs sees it: on the virtual clock, streams on its
    timeline and the program's clock the emulated one; a virtual CUDA device (cuda.py) with the
    chip's HBM (hbm.py); fake tensors where the program asks (Program.wrap)."""
    virtual = isinstance(compute, Timeline)
    with contextlib.ExitStack() as stack:
        if virtual:
            stack.enter_context(streams.emulated(compute, engine))
        if program.gpu:
            throttle.memory = Hbm(job.system.chip)
            stack.enter_context(cuda.emulated(job.system.chip, throttle.memory,
                                          count=job.system.domain_sizes[job.system.domain_of(engine.device)]))
        if virtual and program.gpu and not program.host_clock:
            stack.enter_context(clock.emulated(compute))
        if program.wrap is not None:
            stack.enter_context(program.wrap(throttle))
        try:
            yield
        finally:
            throttle.memory = None


def _forget_meshes() -> None:
    """DTensor caches its sharding decisions by mesh, and meshes of two programs run in one worker
    compare equal (same shape, same ranks) while holding different process groups: a second
    program would redistribute over the first's groups, destroyed since. Each starts afresh."""
    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    _gen_transform_infos.cache_clear()


def _take_over(device: int, world: int, alone: bool = False):
    """init_process_group(...) of any backend starts the relay group; returns the undo. `alone`
    (a shared run's recording): on a store of its own, as the given rank, with no rendezvous."""
    original = dist.init_process_group

    def init_process_group(backend=None, *args, **kwargs):
        if dist.is_initialized():  # cluster.launch has done it already
            return None
        if backend not in (None, "relay") and device == 0:
            print(f"relay: init_process_group(backend={backend!r}) runs on the 'relay' backend "
                  "(the emulated fabric)", file=sys.stderr, flush=True)
        kwargs.pop("device_id", None)
        if alone:
            kwargs.pop("init_method", None)
            kwargs.update(store=dist.HashStore(), rank=device, world_size=world)
        return original("relay", *args, **kwargs)

    dist.init_process_group = init_process_group
    dist.distributed_c10d.init_process_group = init_process_group

    def restore():
        dist.init_process_group = original
        dist.distributed_c10d.init_process_group = original
    return restore
