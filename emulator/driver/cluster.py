"""Cluster: the device workers of one experiment, on an embedded or an existing Ray cluster.

    with Cluster(System.preset("hgx-h100"), clock="virtual") as cluster:
        cluster.run_matmuls([1024, 2048])
        outputs, seconds = cluster.all_reduce(tensors, algorithm="ring")

The Cluster owns the pool of workers and the settings every job shares (system, clock, cost
settings, faults); what runs on the workers are functions (emulator/device/jobs.py, training.py)
sent with `cluster.run(fn, *args)`. A job runs on the first `system.devices` workers, so one pool
serves systems of any size up to the number started (`configure` switches the system between
jobs, growing the pool if needed). Exiting kills every worker it started (see session.py for
the Ray session it uses).
"""

from __future__ import annotations

import math
import secrets
import time

import ray

from relay.device import jobs
from relay.device.backend.program import Program
from relay.device.job import Faults, Job
from relay.device.plane.transport import DATA_PLANES
from relay.driver import collectives as _collectives
from relay.driver import programs as _programs
from relay.driver import training as _training
from relay.driver.monitor import Failed, failure, gather
from relay.driver.pacing import CLOCKS, make_job
from relay.driver.session import MEMORY_MB, connect_ray, place_workers, release, resolve_address, wait_gone
from relay.errors import ConfigError
from relay.hardware.system import System
from relay.kernels.calibrate import calibrate
from relay.kernels.cost import CostModel
from relay.parallel import Parallel
from relay.trainer import TENSORS, TrainConfig


def _system(system) -> System:
    if isinstance(system, System):
        return system
    if isinstance(system, str):
        return System.preset(system)
    raise ConfigError(f"system = {system!r} is not a System; pass relay.System(...) or a preset "
                     f"name ({', '.join(System.presets())})")


SHARED_ABOVE = 16  # fake-tensor runs of more devices than this are shared runs by default


class Cluster:
    def __init__(self, system, clock: str = "virtual", dilation: float | None = None,
                 address: str | None = None, device: str = "cpu", *, dtype: str = "bf16",
                 efficiency: dict | None = None, timeout_s: float = 30.0, memory_mb: float = MEMORY_MB,
                 check_dilation: bool = True, faults: Faults | None = None, data_plane: str = "auto",
                 tensors: str = "real"):
        self.system = _system(system)
        _check_settings(device, timeout_s, memory_mb, tensors, data_plane)
        self.tensors = tensors  # what training runs on unless its config says (TrainConfig.tensors)
        self.clock, self.dilation = clock, dilation
        self._check_clock()
        self.efficiency = dict(efficiency or {})
        try:  # the cost model (below this layer) checks dtype and efficiencies, on every kind of chip
            for chip in set(self.system.chips):
                CostModel(chip, dtype, **self.efficiency)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if address is not None:
            resolve_address(address)  # a malformed address fails here, before any worker
        self.address, self.device, self.dtype = address, device, dtype
        self.timeout_s, self.memory_mb, self.check_dilation = timeout_s, memory_mb, check_dilation
        self.faults = faults or Faults()
        self.faults.check(self.system.devices)
        self.data_plane = data_plane
        self.actors: list = []  # the device workers, in device order
        self.info: list[dict] = []  # per worker: pid, node_ip, node_id, hostname
        self._pgs: list = []
        self._owns_ray = False
        self.host = None  # HostCalibration, measured on start

    def _check_clock(self) -> None:
        if self.clock not in CLOCKS:
            raise ConfigError(f"clock = {self.clock!r} is unknown; choose 'virtual' or 'wall'")
        if self.dilation is not None:
            if self.clock != "wall":
                raise ConfigError(f"dilation = {self.dilation!r} applies to clock='wall' only; "
                                 "drop it or set clock='wall'")
            if isinstance(self.dilation, bool) or not isinstance(self.dilation, (int, float)) \
                    or not math.isfinite(self.dilation) or self.dilation <= 0:
                raise ConfigError(f"dilation = {self.dilation!r} is invalid; give real seconds per "
                                 "emulated second (> 0), or None to choose it automatically")

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> Cluster:
        self._owns_ray = connect_ray(self.address) or self._owns_ray
        self.host = calibrate()
        try:
            self._grow(_workers(self.system, self.tensors))
        except BaseException:
            self.close()  # nothing half-started is left behind
            raise
        return self

    def close(self) -> None:
        """Kill every worker this cluster started (and the embedded Ray, if it started one)."""
        release(self.actors, self._pgs)
        local = ray.util.get_node_ip_address() if ray.is_initialized() else None
        pids = [i["pid"] for i in self.info if i["node_ip"] == local]
        self.actors, self.info, self._pgs = [], [], []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
        wait_gone(pids, timeout_s=15)

    @property
    def pids(self) -> list[int]:
        return [i["pid"] for i in self.info]

    def configure(self, system=None, clock: str | None = None, dilation=...,
                  faults: Faults | None = None) -> Cluster:
        """Switch the system (any size; more workers are started if needed), the clock, or the
        injected faults."""
        if system is not None:
            self.system = _system(system)
        if faults is not None:
            self.faults = faults
        self.faults.check(self.system.devices)
        if clock is not None:
            self.clock = clock
            if dilation is ...:
                self.dilation = None
        if dilation is not ...:
            self.dilation = dilation
        self._check_clock()
        if self.actors and _workers(self.system, self.tensors) > len(self.actors):
            self._grow(_workers(self.system, self.tensors))
        return self

    def _grow(self, n: int) -> None:
        have = len(self.actors)
        if n <= have:
            return
        system = self.system
        workers, groups = place_workers(lambda i: system.domain_of(i) if i < system.devices else i,
                                        have, n, self.device, self.memory_mb)
        self.actors += workers
        self._pgs += groups
        # starting a torch process takes ~1.3 s of a core: be generous, and do not ping yet
        self.info = self.run(jobs.identify, what="start-up", devices=len(self.actors), ping=False,
                             deadline_s=120 + 3 * n)
        self._connect()

    def _connect(self, tries: int = 3) -> None:
        """(Re)build the transport over all workers; rank 0 picks the address and a free port."""
        world = len(self.actors)
        nodes = {i["node_ip"] for i in self.info}
        host = "127.0.0.1" if len(nodes) == 1 else self.info[0]["node_ip"]
        for attempt in range(tries):
            addr, port = ray.get(self.actors[0].run.remote(jobs.address, host))
            secret = secrets.token_hex(16)  # reaches the devices through Ray, never the store
            try:
                self.run(jobs.connect, addr, port, world, self.timeout_s, self.data_plane, secret,
                         what="transport set-up", devices=world, abort=attempt == tries - 1)
                return
            except Failed:
                if attempt == tries - 1:
                    raise

    # ---------------------------------------------------------------- running functions
    def run(self, fn, *args, each: list | None = None, what: str = "a job", devices: int | None = None,
            abort: bool = True, on_poll=None, ping: bool = True, deadline_s: float | None = None) -> list:
        """fn(device, *args, *each[d]) on the first `devices` workers d (default: the system's),
        one result per device; `each` holds arguments of each device's own. The first failure
        stops the run: with `abort`, every worker is killed and a DeviceError names the device
        (see monitor.py); without, monitor.Failed is raised for the caller to complete."""
        n = self.system.devices if devices is None else devices
        refs = [w.run.remote(fn, *args, *(each[d] if each else ())) for d, w in enumerate(self.actors[:n])]
        try:
            return gather(self.actors[:n], refs, self.timeout_s, on_poll=on_poll, ping=ping,
                          deadline_s=deadline_s)
        except Failed as e:
            if not abort:
                raise
            self.close()
            raise failure(e.errors, what) from None

    def job(self, ratio: float) -> Job:
        """The settings of one run; `ratio` is the job's worst real/emulated time on this host."""
        return make_job(self, ratio, time.time())

    # ---------------------------------------------------------------- jobs
    def run_matmuls(self, sizes: list[int], repeats: int | list[int] = 1) -> list[dict]:
        """Square matmuls of `sizes` on every device, throttled. Per device: emulated_s (on the
        wall clock measured, on the virtual clock modelled), modeled_s (the cost model's sum),
        real_s, flops, fidelity, overrun_s and per-size rows."""
        return _collectives.run_matmuls(self, sizes, repeats)

    def collective(self, primitive: str, tensors: list, algorithm: str = "ring", op: str = "sum",
                   root: int = 0, chunks: int | None = None, repeats: int = 1):
        """One collective over the devices: `tensors` holds one tensor per device."""
        return self.collectives(primitive, [tensors], algorithm, op, root, chunks, repeats)[0]

    def collectives(self, primitive: str, cases: list, algorithm: str = "ring", op: str = "sum",
                    root: int = 0, chunks: int | None = None, repeats: int = 1) -> list:
        """Several collectives in one call to the devices. A case is a list with one tensor per
        device, or (numel, dtype name) for tensors of ones made on the devices (benchmarks)."""
        return _collectives.collectives(self, primitive, cases, algorithm, op, root, chunks, repeats)

    def all_reduce(self, tensors, algorithm="ring", op="sum", **kw):
        return self.collective("all_reduce", tensors, algorithm, op, **kw)

    def reduce_scatter(self, tensors, algorithm="ring", op="sum", **kw):
        return self.collective("reduce_scatter", tensors, algorithm, op, **kw)

    def all_gather(self, tensors, algorithm="ring", **kw):
        return self.collective("all_gather", tensors, algorithm, **kw)

    def broadcast(self, tensors, algorithm="ring", root=0, **kw):
        return self.collective("broadcast", tensors, algorithm, root=root, **kw)

    def launch(self, fn, *args, tensors: str | None = None, host_clock: bool = False, shared: bool = False,
               **kwargs) -> _programs.LaunchResult:
        """fn(*args, **kwargs) on every device, torch.distributed initialised on the `relay` backend;
        each device's result and emulated times (driver/programs.py; relay.dist inside fn).
        `tensors`: the Cluster's unless given; `host_clock`: fn's time.* read the host's clock;
        `shared`: rank 0 alone, every device replayed (fake tensors; driver/launch_shared.py)."""
        tensors = (self.tensors if tensors is None else tensors) if shared else _launch_tensors(self, tensors)
        return _programs.launch(self, Program(fn, args, kwargs, host_clock=host_clock), tensors=tensors, shared=shared)

    def preflight(self, workload=None, **options) -> _training.Preflight:
        """Every check of a training run that needs no device (settings, algorithm against the
        layout, memory, and on the wall clock the dilation). train() runs it unless given its
        result; run it yourself to fail before any worker starts. Takes a TrainConfig, or a
        workload and TrainConfig's options."""
        return _training.preflight(self, _run_config(self, workload, options))

    def train(self, workload=None, *, csv: str | None = None, preflight=None, **options):
        """Training on the devices; returns a TrainResult. `workload`: a Workload, a name, an import
        path or a whole TrainConfig; `options`: TrainConfig's fields (steps, per_device_batch, ...,
        and `parallel=Parallel(dp=, tp=, pp=, ep=, fsdp=)`: PyTorch's own parallelism on `relay`)."""
        return _training.train(self, _run_config(self, workload, options), preflight, csv)

    def __repr__(self) -> str:
        return f"Cluster({self.system.describe()}, clock={self.clock!r}, workers={len(self.actors)})"


def _config(workload, options: dict) -> TrainConfig:
    if isinstance(workload, TrainConfig):
        return workload.replace(**options) if options else workload
    return TrainConfig(workload=workload, **options) if workload is not None else TrainConfig(**options)


def _run_config(cluster, workload, options: dict) -> TrainConfig:
    """The run's TrainConfig: tensors from the cluster unless given (TrainConfig then checks routing
    and shared against them); fake tensors without a plan run data-parallel over every device."""
    config = _config(workload, options)
    if config.tensors is None:
        config = config.replace(tensors=cluster.tensors)
    if config.fake and config.parallel is None:
        config = config.replace(parallel=Parallel(dp=cluster.system.devices))
    if config.shared is None:
        config = config.replace(shared=config.fake and cluster.system.devices > SHARED_ABOVE)
    return config


def _launch_tensors(cluster, tensors: str | None) -> str:
    """cluster.launch's tensors: the cluster's unless given; a fake cluster that starts one worker
    (shared runs) cannot run fn on a worker per device."""
    tensors = cluster.tensors if tensors is None else tensors
    if tensors == "fake" and _workers(cluster.system, cluster.tensors) < cluster.system.devices:
        raise ConfigError(f"Cluster(tensors='fake') of {cluster.system.devices} devices starts one worker "
                          "(its training runs are shared) and cluster.launch runs fn on a worker per device; "
                          f"use at most {SHARED_ABOVE} devices, or Cluster(..., tensors='real')"
                          ".launch(fn, tensors='fake')")
    return tensors


def _workers(system, tensors: str) -> int:
    """Workers to start: one per device, but a fake-tensor cluster of more than SHARED_ABOVE
    devices starts one (its runs are shared: driver/shared.py starts a worker per role)."""
    return 1 if tensors == "fake" and system.devices > SHARED_ABOVE else system.devices


def _check_settings(device: str, timeout_s, memory_mb, tensors: str, data_plane: str) -> None:
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device = {device!r} is not a host device; choose 'cpu' or 'cuda'")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ConfigError(f"timeout_s = {timeout_s!r} is invalid; give seconds > 0")
    if not (isinstance(memory_mb, (int, float)) and memory_mb > 0):
        raise ConfigError(f"memory_mb = {memory_mb!r} is invalid; give MB > 0 per device")
    if tensors not in TENSORS:
        raise ConfigError(f"tensors = {tensors!r} is unknown; choose 'real' (data) or 'fake' (shapes only)")
    if data_plane not in DATA_PLANES:
        raise ConfigError(f"data_plane = {data_plane!r} is unknown; choose 'auto' (shared memory "
                          "between devices on one node, gloo across nodes) or 'gloo' (gloo everywhere)")
