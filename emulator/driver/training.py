"""The driver side of training: the checks before any device runs (once per run), the run on
the device workers, the progress fetched while they train, and the result, or, when a device
fails, the one DeviceError that carries the steps already finished."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import ray
import torch

from relay.analytic import footprint
from relay.collectives import resolve, topology_of
from relay.collectives.schedules import schedule
from relay.device.training import loop as device_training
from relay.device.training import parallel as device_plans
from relay.driver import shared
from relay.driver.metrics import TrainResult, aggregate
from relay.driver.monitor import Failed, blame, failure
from relay.driver.pacing import comm_ratio
from relay.driver.programs import rendezvous
from relay.errors import ConfigError
from relay.kernels.clock import VirtualLane
from relay.kernels.cost import CostModel
from relay.kernels.throttle import ParameterTensors, Throttle
from relay.trainer import Optimizer, TrainConfig, memory_estimate
from relay.workloads import BUILTINS


@dataclass(frozen=True)
class Preflight:
    """What the checks found: the config they passed, the memory need, the host's pace."""
    config: TrainConfig
    system: object  # the System it was checked against
    clock: str
    memory: dict  # memory_estimate's breakdown, bytes
    ratio: float  # real seconds per emulated second of this job on this host (wall clock)


def preflight(cluster, config: TrainConfig) -> Preflight:
    system = cluster.system
    n = system.devices
    algorithm = resolve("all_reduce", config.algorithm, n, system)[0]
    schedule("all_reduce", algorithm, 0, n, n, topology_of(system))  # refuses bad layouts
    cluster.faults.check(n)
    if config.parallel is not None:
        config.parallel.check(n, system.domain, config.workload.config, config.batch_for(config.parallel.dp))
    batch = config.batch_for(config.replicas(n))  # a device's, or under a plan a replica's
    if config.fake and cluster.clock != "virtual":
        raise ConfigError("tensors = 'fake' runs on the virtual clock (its host time says nothing of the "
                          "emulated one); use clock = 'virtual'")
    memory = check_plan_memory(config, system, cluster.dtype) if config.parallel is not None and \
        config.workload.name in BUILTINS and hasattr(config.workload.config, "n_layers") else \
        check_memory(config, system, batch, cluster.dtype)
    ratio = 1.0
    if cluster.clock == "wall":
        ratio = max(probe_ratio(config, system, batch, cluster.dtype, cluster.efficiency),
                    comm_ratio(system, config.bucket_mb * 1e6))
        cluster.job(ratio)  # refuses a dilation this host cannot honour
    return Preflight(config, system, cluster.clock, memory, ratio)


def train(cluster, config: TrainConfig, checked: Preflight | None = None, csv: str | None = None) -> TrainResult:
    """Data-parallel training of `config` on the cluster's devices (see Cluster.train)."""
    if checked is None or (checked.config, checked.system, checked.clock) != (config, cluster.system, cluster.clock):
        checked = preflight(cluster, config)
    system = cluster.system
    n = system.devices
    job = cluster.job(checked.ratio)
    _ship_by_value(config.workload)
    replicas = config.replicas(n)
    record = {**config.as_dict(), "per_device_batch": config.batch_for(replicas),
              "global_batch": config.global_samples(n),
              "tokens_per_sample": config.workload.tokens_per_sample, "lr": config.lr_used,
              "optimizer": config.optimizer_used, "clock": cluster.clock, "dilation": job.dilation,
              "dtype": cluster.dtype, "devices": n, "system": system.describe(),
              "power_basis": system.power_basis,
              "memory_bytes": checked.memory, "loss_floor": config.workload.loss_floor}
    progress = _Progress(cluster.actors[:n])
    try:
        # a parallelism plan runs on torch.distributed's own APIs over the relay backend
        if config.shared:  # one worker per role records; every device is replayed from it
            res = shared.run(cluster, job, config)
        else:
            if config.parallel is not None:
                with rendezvous(cluster) as address:
                    res = cluster.run(device_plans.train, job, config, address, what="training", abort=False,
                                      on_poll=progress.poll)
            else:
                res = cluster.run(device_training.train, job, config, what="training", abort=False,
                                  on_poll=progress.poll)
    except Failed as e:  # keep what was measured: the steps every surviving device finished
        culprit, _ = blame(e.errors)
        rows = progress.final(skip=culprit)
        cluster.close()
        survivors = [r for d, r in enumerate(rows) if d != culprit]
        step = min(len(r) for r in survivors) if survivors else 0
        completed = None
        if step:
            done = [r[:step] for r in rows]
            completed = TrainResult(aggregate([{"rows": r} for r in done], system, config, cluster.dtype, step),
                                    {}, {**record, "completed_steps": step}, done)
        raise failure(e.errors, "training", step, completed) from None
    state = {k: v for r in res for k, v in r.get("state_dict", {}).items()}  # a plan's devices hold parts
    result = TrainResult(aggregate(res, system, config, cluster.dtype), state, record,
                         [r["rows"] for r in res])
    if csv:
        result.to_csv(csv)
    return result


def _ship_by_value(workload) -> None:
    """A user's workload may live in a module the devices cannot import (a test file, a script
    outside the package path): send its code along with it rather than by module name."""
    for f in (workload.build_model, workload.batches, workload.loss):
        name = getattr(f, "__module__", None) or ""
        if name and not name.startswith(("relay.", "torch")) and name in sys.modules and name != "__main__":
            ray.cloudpickle.register_pickle_by_value(sys.modules[name])


class _Progress:
    """Training rows fetched from the devices while they train (they answer on a second thread),
    so that a failure loses no step already finished."""

    def __init__(self, actors):
        self.actors, self.rows, self.asked = actors, [[] for _ in actors], {}
        self.polls = 0  # times the driver polled (a test checks that it keeps polling)

    def poll(self) -> None:
        self.polls += 1
        for d, actor in enumerate(self.actors):
            ref = self.asked.get(d)
            if ref is not None:
                if not ray.wait([ref], timeout=0)[0]:
                    continue
                try:
                    self.rows[d] = ray.get(ref)
                except ray.exceptions.RayError:
                    pass
            self.asked[d] = actor.progress.remote()

    def final(self, skip: int, timeout_s: float = 5.0) -> list[list[dict]]:
        """The latest rows of every device still alive (the failed one keeps its last poll's)."""
        refs = {d: a.progress.remote() for d, a in enumerate(self.actors) if d != skip}
        for d, ref in refs.items():
            try:
                self.rows[d] = ray.get(ref, timeout=timeout_s)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                pass
        return self.rows


def check_plan_memory(config: TrainConfig, system, dtype: str = "bf16") -> dict:
    """The most loaded device's memory under the plan (analytic/footprint.py) against the smallest
    HBM of the system's chips; refuses, with the breakdown, a plan that does not fit."""
    chip = min(set(system.chips), key=lambda c: c.hbm_bytes)
    fp = footprint.check(config.workload.name, config.parallel, config.global_samples(system.devices), chip.name,
                         dtype=dtype, optimizer=config.optimizer_used)
    return {"parameters": fp.parameters, "gradients": fp.gradients, "optimizer": fp.optimizer,
            "activations": fp.activations, "total": fp.total, "device": fp.device}


def check_memory(config: TrainConfig, system, per_device_batch: int, dtype: str = "bf16") -> dict:
    """memory_estimate against the smallest HBM of the system's chips; refuses, with the
    breakdown, a run that does not fit."""
    need = memory_estimate(config, per_device_batch, dtype)
    chip = min(set(system.chips), key=lambda c: c.hbm_bytes)  # the tightest device decides
    have = chip.hbm_bytes
    if need["total"] > have:
        gb = lambda b: f"{b / 1e9:.3g} GB"  # noqa: E731
        scale = f" x batch_scale {config.batch_scale}" if config.batch_scale != 1 else ""
        raise ConfigError(
            f"memory: {config.workload.name} needs {gb(need['total'])} per device (parameters "
            f"{gb(need['parameters'])}, gradients {gb(need['gradients'])}, optimizer state "
            f"{gb(need['optimizer'])}, activations {gb(need['activations'])} at per_device_batch="
            f"{per_device_batch}{scale}) but {chip.name} has {gb(have)} of HBM; use a smaller "
            "per_device_batch or a chip with more memory")
    return need


def probe_ratio(config: TrainConfig, system, per_device_batch: int, dtype: str = "bf16",
                efficiency: dict | None = None, steps: int = 2) -> float:
    """Real seconds per emulated second of compute for this workload on this host, from a few
    unthrottled steps in this process (the wall clock's dilation is chosen from it)."""
    wl = config.workload
    torch.manual_seed(0)
    model = wl.build_model()
    opt = Optimizer(wl.optimizer, model.parameters(), wl.lr)
    data = wl.batches(0, 1, per_device_batch, 0)
    lane = VirtualLane()
    fastest = max(set(system.chips), key=lambda c: c.peak_flops(dtype))  # the tightest pacing
    best = float("inf")
    for _ in range(steps):
        batch = next(data)
        t0, e0 = time.perf_counter(), lane.t
        with Throttle(CostModel(fastest, dtype, **(efficiency or {})), lane) as throttle:
            throttle.fixed = ParameterTensors(model.parameters())
            throttle.batch_scale = config.batch_scale
            wl.loss(model, batch).backward()
            throttle.batch_scale = 1.0
            opt.step()
            opt.zero_grad()
        best = min(best, (time.perf_counter() - t0) / (lane.t - e0))
    return best
