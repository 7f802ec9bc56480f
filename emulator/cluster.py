"""Cluster: the device actors of one experiment, on an embedded or an existing Ray cluster.

    with Cluster(System.preset("hgx-h100"), clock="virtual") as cluster:
        cluster.run_matmuls([1024, 2048])
        outputs, seconds = cluster.all_reduce(tensors, algorithm="ring")

With no address and no Ray running in the process, the cluster starts an embedded local Ray
(no dashboard) and shuts it down on exit; with an address, or when Ray is already initialised,
it uses that cluster and leaves it running. Either way, exiting kills every actor it started.
A job runs on the first `system.devices` actors, so one set of actors serves systems of any size
up to the number started (`configure` switches the system between jobs, growing if needed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import uuid
from pathlib import Path

import psutil
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from emulator.collectives import DTYPE_BYTES, pipeline_chunks, topology_of
from emulator.collectives.core import link_function
from emulator.collectives.local import execute
from emulator.collectives.schedules import check as check_collective, schedule
from emulator.device import Faults, Job, RemoteDevice
from emulator.monitor import DeviceError, gather
from emulator.system import System
from kernels.calibrate import calibrate, check_dilation, dilation_for
from kernels.cost import CostModel

MEMORY_MB = 300  # Ray memory reserved per device actor (a torch process is ~175 MB unique)
CPU_PER_DEVICE = 0.01  # Ray CPU per device: devices time-share cores; the dilation keeps them honest
HOST_LATENCY_S = 6e-3  # conservative real one-way message time between actors on one host (median
#                       0.4 ms through the transport, but a device waking from a sleep can take 2 ms)
HOST_BPS = 0.25e9  # conservative real bytes/s per message between actors on one host (2.4e9 measured
#                    for one idle pair, ~0.6e9 per device in a 4-actor ring on 2 cores)
CLOCKS = ("virtual", "wall")
MAX_DILATION = 1e8  # beyond this, an emulated microsecond would take minutes of real time
OPS = ("sum", "avg")


class CollectiveResult:
    """Per-device outputs and the emulated seconds; unpacks as (outputs, emulated_s)."""

    def __init__(self, outputs, emulated_s, per_device_s, real_s, fidelity):
        self.outputs = outputs  # one tensor per device
        self.emulated_s = emulated_s  # the collective's emulated time: slowest device, seconds
        self.per_device_s = per_device_s  # each device's emulated finishing time
        self.real_s = real_s  # host wall seconds (slowest device)
        self.fidelity = fidelity  # wall clock: 1 - |measured / model - 1|; virtual: 1.0

    def __iter__(self):
        return iter((self.outputs, self.emulated_s))


def record_path() -> Path:
    """Where `relay cluster up` records the cluster it started ($RELAY_HOME, default ~/.relay)."""
    return Path(os.environ.get("RELAY_HOME", Path.home() / ".relay")) / "cluster.json"


def _use_token(path: str) -> None:
    """Present the recorded cluster's shared secret. Ray reads RAY_AUTH_MODE and the token path
    from the environment, but caches its config when it is imported, so refresh it the way Ray's
    own ray.init does for a new local cluster (authentication_token_setup._enable_token_auth)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = path
    from ray._raylet import AuthenticationTokenLoader, Config
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def resolve_address(address: str) -> str:
    """'recorded' (the cluster `relay cluster up` started), 'auto' (Ray finds one), or host:port."""
    if address == "recorded":
        path = record_path()
        if not path.exists():
            raise ValueError(f"address = 'recorded' but no cluster is recorded in {path}; run "
                             "`relay cluster up` first, or give host:port or 'auto'")
        rec = json.loads(path.read_text())
        if rec.get("token"):
            _use_token(rec["token"])
        return rec["address"]
    if address != "auto" and not re.fullmatch(r"(ray://)?[\w.\-]+:\d+", address):
        raise ValueError(f"address = {address!r} is not an address; give host:port, 'auto' or 'recorded'")
    return address


def _system(system) -> System:
    if isinstance(system, System):
        return system
    if isinstance(system, str):
        return System.preset(system)
    raise ValueError(f"system = {system!r} is not a System; pass emulator.System(...) or a preset "
                     f"name ({', '.join(System.presets())})")


class Cluster:
    def __init__(self, system, clock: str = "virtual", dilation: float | None = None,
                 address: str | None = None, device: str = "cpu", *, dtype: str = "bf16",
                 efficiency: dict | None = None, timeout_s: float = 30.0, memory_mb: float = MEMORY_MB,
                 check_dilation: bool = True, faults: Faults | None = None):
        self.system = _system(system)
        self.clock, self.dilation = clock, dilation
        self._check_clock()
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device = {device!r} is not a host device; choose 'cpu' or 'cuda'")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"timeout_s = {timeout_s!r} is invalid; give seconds > 0")
        if not (isinstance(memory_mb, (int, float)) and memory_mb > 0):
            raise ValueError(f"memory_mb = {memory_mb!r} is invalid; give MB > 0 per device")
        self.efficiency = dict(efficiency or {})
        CostModel(self.system.chip, dtype, **self.efficiency)  # validates dtype and efficiencies
        if address is not None:
            resolve_address(address)  # a malformed address fails here, before any actor
        self.address, self.device, self.dtype = address, device, dtype
        self.timeout_s, self.memory_mb, self.check_dilation = timeout_s, memory_mb, check_dilation
        self.faults = faults or Faults()
        self.faults.check(self.system.devices)
        self.actors: list = []
        self.info: list[dict] = []  # per actor: pid, node_ip, hostname
        self._pgs: list = []
        self._owns_ray = False
        self.host = None  # HostCalibration, measured on start

    def _check_clock(self) -> None:
        if self.clock not in CLOCKS:
            raise ValueError(f"clock = {self.clock!r} is unknown; choose 'virtual' or 'wall'")
        if self.dilation is not None:
            if self.clock != "wall":
                raise ValueError(f"dilation = {self.dilation!r} applies to clock='wall' only; "
                                 "drop it or set clock='wall'")
            if isinstance(self.dilation, bool) or not isinstance(self.dilation, (int, float)) \
                    or not math.isfinite(self.dilation) or self.dilation <= 0:
                raise ValueError(f"dilation = {self.dilation!r} is invalid; give real seconds per "
                                 "emulated second (> 0), or None to choose it automatically")

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "Cluster":
        if not ray.is_initialized():
            if self.address is None:
                # errors still reach the driver as exceptions; worker start-up chatter does not.
                # Ray warns once more workers start than it has CPUs; Relay's devices time-share
                # cores on purpose, so raise the threshold (Ray's own knob; it cannot be muted).
                os.environ.setdefault("RAY_worker_maximum_startup_concurrency", "256")
                ray.init(address="local", num_cpus=psutil.cpu_count() or 1, include_dashboard=False,
                         object_store_memory=512 * 2**20, logging_level=logging.ERROR, log_to_driver=False,
                         namespace=f"relay-{uuid.uuid4().hex[:8]}")
            else:
                ray.init(address=resolve_address(self.address), logging_level=logging.ERROR,
                         namespace=f"relay-{uuid.uuid4().hex[:8]}")
            self._owns_ray = True
        self.host = calibrate()
        try:
            self._grow(self.system.devices)
        except BaseException:
            self.close()  # nothing half-started is left behind
            raise
        return self

    def close(self) -> None:
        """Kill every actor this cluster started (and the embedded Ray, if it started one)."""
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already dead
                pass
        for pg in self._pgs:
            try:
                remove_placement_group(pg)
            except Exception:
                pass
        local = ray.util.get_node_ip_address() if ray.is_initialized() else None
        pids = [i["pid"] for i in self.info if i["node_ip"] == local]
        self.actors, self.info, self._pgs = [], [], []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
        _wait_gone(pids, timeout_s=15)

    @property
    def pids(self) -> list[int]:
        return [i["pid"] for i in self.info]

    def configure(self, system=None, clock: str | None = None, dilation=...,
                  faults: Faults | None = None) -> "Cluster":
        """Switch the system (any size; more actors are started if needed), the clock, or the
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
        if self.actors and self.system.devices > len(self.actors):
            self._grow(self.system.devices)
        return self

    def _grow(self, n: int) -> None:
        have = len(self.actors)
        if n <= have:
            return
        new = n - have
        mem = self.memory_mb * 2**20
        gpu = 0.0
        if self.device == "cuda":
            total_gpu = ray.cluster_resources().get("GPU", 0)
            if total_gpu <= 0:
                raise ValueError("device = 'cuda' but the Ray cluster has no GPU; use device='cpu'")
            gpu = min(1.0, total_gpu / n)
        fit = devices_that_fit(mem, gpu)
        if fit < new:
            raise ValueError(f"the Ray cluster has room for {fit} more device(s) (at {self.memory_mb} MB "
                             f"each, counted node by node), but {new} were asked (devices = {n}); use "
                             "fewer devices, a smaller memory_mb, or a larger cluster")
        bundle = {"CPU": CPU_PER_DEVICE, "memory": mem} | ({"GPU": gpu} if gpu else {})
        # one placement group per scale-up domain, packed onto as few nodes as it fits (and spread
        # over more only when it must be): a domain's traffic then stays inside a node
        domains = {}
        for i in range(have, n):
            domains.setdefault(self.system.domain_of(i) if i < self.system.devices else i, []).append(i)
        for members in domains.values():
            pg = placement_group([bundle] * len(members), strategy="PACK")
            if not _wait_ready(pg.ready(), timeout_s=60):
                remove_placement_group(pg)
                raise RuntimeError(f"could not place {len(members)} device(s) on the Ray cluster within 60 s")
            self._pgs.append(pg)
            for k, i in enumerate(members):
                strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=k)
                self.actors.append(RemoteDevice.options(  # a second thread answers pings and
                    num_cpus=CPU_PER_DEVICE, num_gpus=gpu, memory=mem, scheduling_strategy=strategy,
                    max_concurrency=2,  # progress queries while the first one works
                ).remote(i, self.device))
        # starting a torch process takes ~1.3 s of a core: be generous, and do not ping yet
        self.info = self._gather([a.ready.remote() for a in self.actors], "start-up", ping=False,
                                 deadline_s=120 + 3 * n)
        self._connect()

    def _connect(self, tries: int = 3) -> None:
        """(Re)build the gloo group over all actors; rank 0 picks the address and a free port."""
        world = len(self.actors)
        nodes = {i["node_ip"] for i in self.info}
        host = "127.0.0.1" if len(nodes) == 1 else self.info[0]["node_ip"]
        for attempt in range(tries):
            addr, port = ray.get(self.actors[0].free_address.remote(host))
            try:
                self._gather([a.connect.remote(addr, port, world, self.timeout_s) for a in self.actors],
                             "transport set-up", abort=attempt == tries - 1)
                return
            except DeviceError:
                if attempt == tries - 1:
                    raise

    # ---------------------------------------------------------------- calls
    def _gather(self, refs: list, what: str, abort: bool = True, on_poll=None, **kw) -> list:
        """Results of one call per device (refs[i] on actor i). The first failure stops the run:
        every actor is killed and a DeviceError names the device (see emulator/monitor.py)."""
        try:
            return gather(self.actors[:len(refs)], refs, what, self.timeout_s, on_poll=on_poll, **kw)
        except DeviceError:
            if abort:
                self.close()
            raise

    def _job(self, ratio: float) -> Job:
        """The settings of one run; `ratio` is the job's worst real/emulated time on this host."""
        n = self.system.devices
        dilation, epoch = None, None
        if self.clock == "wall":
            cores = (self.host or calibrate()).cores
            needed = dilation_for(ratio, n, cores)
            if not needed < MAX_DILATION:
                raise ValueError(f"clock = 'wall' cannot pace this job: it would need dilation {needed:.3g} "
                                 "(the emulated ops or links are far faster than this host can time); "
                                 "use clock='virtual'")
            if self.dilation is not None and self.check_dilation:
                check_dilation(self.dilation, needed, n, cores)
            dilation = self.dilation or needed
            epoch = time.time() + 0.3 + 0.02 * n  # every device has the call before emulated 0
        return Job(self.system, self.clock, dilation, epoch, self.dtype, self.efficiency, self.timeout_s,
                   self.faults)

    # ---------------------------------------------------------------- compute-only job
    def run_matmuls(self, sizes: list[int], repeats: int | list[int] = 1) -> list[dict]:
        """Square matmuls of `sizes` on every device, throttled. Per device: emulated_s (measured),
        modeled_s (the cost model's sum), real_s, flops, fidelity, overrun_s and per-size rows."""
        sizes = [int(s) for s in sizes]
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"sizes = {sizes!r} is invalid; give matrix sizes >= 1")
        reps = [repeats] * len(sizes) if isinstance(repeats, int) else list(repeats)
        if len(reps) != len(sizes) or any(r < 1 for r in reps):
            raise ValueError(f"repeats = {repeats!r} is invalid; give an int >= 1 or one per size")
        host = self.host or calibrate()
        models = [CostModel(chip, self.dtype, **self.efficiency) for chip in set(self.system.chips)]
        ratio = max(host.matmul_real_s(s) / m.matmul_cost(s, s, s).seconds for s in sizes for m in models)
        job = self._job(ratio)
        n = self.system.devices
        out = self._gather([a.run_matmuls.remote(job, sizes, reps) for a in self.actors[:n]], "run_matmuls")
        for r in out:
            r["dilation"] = job.dilation
        return out

    # ---------------------------------------------------------------- collectives
    def collective(self, primitive: str, tensors: list, algorithm: str = "ring", op: str = "sum",
                   root: int = 0, chunks: int | None = None, repeats: int = 1) -> CollectiveResult:
        """One collective over the devices: `tensors` holds one tensor per device."""
        return self.collectives(primitive, [tensors], algorithm, op, root, chunks, repeats)[0]

    def collectives(self, primitive: str, cases: list, algorithm: str = "ring", op: str = "sum",
                    root: int = 0, chunks: int | None = None, repeats: int = 1) -> list[CollectiveResult]:
        """Several collectives in one call to the devices. A case is a list with one tensor per
        device, or (numel, dtype name) for tensors of ones made on the devices (benchmarks)."""
        n = self.system.devices
        check_collective(primitive, algorithm)
        if op not in OPS:
            raise ValueError(f"op = {op!r} is unknown; choose 'sum' or 'avg'")
        if op != "sum" and primitive not in ("all_reduce", "reduce_scatter"):
            raise ValueError(f"op = {op!r} does not apply to {primitive}; drop it")
        if not (isinstance(root, int) and 0 <= root < n):
            raise ValueError(f"root = {root!r} is not a device; give 0 <= root < {n}")
        if not (isinstance(repeats, int) and repeats >= 1):
            raise ValueError(f"repeats = {repeats!r} is invalid; give an integer >= 1")
        per_device, biggest, shapes = [[] for _ in range(n)], 0, []
        for case in cases:
            if isinstance(case, tuple):
                numel, dtype = case
                if dtype not in DTYPE_BYTES:
                    raise ValueError(f"dtype = {dtype!r} is unknown; choose one of {', '.join(DTYPE_BYTES)}")
                shape_numel, itemsize, items = numel, DTYPE_BYTES[dtype], [case] * n
            else:
                _check_tensors(case, n)
                shape_numel, itemsize, items = case[0].numel(), case[0].element_size(), case
            count = shape_numel * (n if primitive == "all_gather" else 1)
            schedule(primitive, algorithm, 0, n, count, topology_of(self.system))  # refuses bad layouts
            k = chunks or pipeline_chunks(primitive, algorithm, count * itemsize, self.system)
            biggest = max(biggest, count * itemsize)
            shapes.append((count, itemsize, k))
            for d in range(n):
                per_device[d].append((items[d], k))
        job = self._job(self._comm_ratio(biggest))
        refs = [a.collective.remote(job, primitive, algorithm, per_device[d], op, root, repeats)
                for d, a in enumerate(self.actors[:n])]
        res = self._gather(refs, f"{primitive} ({algorithm})")
        out = []
        for i, (count, itemsize, k) in enumerate(shapes):
            rows = [res[d][i] for d in range(n)]
            times = [r["emulated_s"][-1] for r in rows]
            fidelity = 1.0
            if self.clock == "wall":  # how close the measured time came to the model's
                model = max(execute(primitive, algorithm, n, count, topology_of(self.system),
                                    link_function(self.system, self.faults.link_slowdown), itemsize,
                                    root=root, chunks=k))
                fidelity = max(0.0, 1.0 - abs(max(times) / model - 1.0)) if model > 0 else 1.0
            out.append(CollectiveResult([r["output"] for r in rows], max(times), times,
                                        max(r["real_s"] for r in rows), fidelity))
        return out

    def _comm_ratio(self, nbytes: float) -> float:
        """Worst real/emulated time of one message on this host, small or large."""
        links = [self.system.scaleup] + ([self.system.scaleout] if self.system.domains > 1 else [])
        ratios = [HOST_LATENCY_S / link.latency_s for link in links]
        ratios += [(HOST_LATENCY_S + nbytes / HOST_BPS) / link.seconds(nbytes) for link in links]
        return max(ratios)

    def all_reduce(self, tensors, algorithm="ring", op="sum", **kw) -> CollectiveResult:
        return self.collective("all_reduce", tensors, algorithm, op, **kw)

    def reduce_scatter(self, tensors, algorithm="ring", op="sum", **kw) -> CollectiveResult:
        return self.collective("reduce_scatter", tensors, algorithm, op, **kw)

    def all_gather(self, tensors, algorithm="ring", **kw) -> CollectiveResult:
        return self.collective("all_gather", tensors, algorithm, **kw)

    def broadcast(self, tensors, algorithm="ring", root=0, **kw) -> CollectiveResult:
        return self.collective("broadcast", tensors, algorithm, root=root, **kw)

    # ---------------------------------------------------------------- programs
    def launch(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on every device, with torch.distributed initialised on the `relay`
        backend (emulator.dist.context() gives rank, world and system). Returns a LaunchResult:
        each device's return value and emulated compute and communication time."""
        from emulator.backend.program import Program
        return self.run_program(Program(fn, args, kwargs))

    def run_program(self, program):
        """A Program (a function or a script, and the algorithms to use) on every device."""
        from emulator.programs import launch
        return launch(self, program)

    # ---------------------------------------------------------------- training
    def preflight(self, workload, steps: int = 1, per_device_batch: int = 8, algorithm: str = "ring",
                  lr=None, optimizer=None, bucket_mb=None, batch_scale: int = 1):
        """Every check of a training run that needs no device: settings, algorithm against the
        layout, memory, and on the wall clock the dilation. Returns (workload, memory, ratio).
        train() runs it; run it yourself to fail before any actor starts."""
        from emulator import workloads
        from emulator.trainer import BUCKET_MB, check_memory, probe_ratio
        wl = workloads.get(workload)
        n = self.system.devices
        for name, v in (("steps", steps), ("per_device_batch", per_device_batch), ("batch_scale", batch_scale)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} = {v!r} is invalid; give an integer >= 1")
        if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr = {lr!r} is invalid; give a learning rate > 0")
        if optimizer not in (None, "adamw", "sgd"):
            raise ValueError(f"optimizer = {optimizer!r} is unknown; choose 'adamw' or 'sgd'")
        bucket_mb = BUCKET_MB if bucket_mb is None else bucket_mb
        if not (isinstance(bucket_mb, (int, float)) and bucket_mb > 0):
            raise ValueError(f"bucket_mb = {bucket_mb!r} is invalid; give MB > 0")
        check_collective("all_reduce", algorithm)
        schedule("all_reduce", algorithm, 0, n, n, topology_of(self.system))  # refuses bad layouts
        self.faults.check(n)
        memory = check_memory(wl, self.system, per_device_batch, self.dtype, optimizer, batch_scale)
        ratio = 1.0
        if self.clock == "wall":
            ratio = max(probe_ratio(wl, self.system, per_device_batch, self.dtype, self.efficiency,
                                    batch_scale), self._comm_ratio(bucket_mb * 1e6))
            self._job(ratio)  # refuses a dilation this host cannot honour
        return wl, memory, ratio

    def train(self, workload, steps: int = 10, per_device_batch: int = 8, algorithm: str = "ring",
              seed: int = 0, overlap: bool = True, lr: float | None = None, optimizer: str | None = None,
              bucket_mb: float | None = None, batch_scale: int = 1, csv: str | None = None):
        """Data-parallel training of `workload` (a Workload, "mlp", "gpt-tiny" or
        "package.module:attribute") on the devices. Returns a TrainResult.

        batch_scale: each device really computes per_device_batch samples but is charged (and
        credited, in throughput) for batch_scale times as many: a host core can then stand in for
        a chip working on a realistic batch. Losses are those of the batch really computed."""
        from emulator.trainer import BUCKET_MB, TrainResult, TrainSpec, aggregate
        wl, memory, ratio = self.preflight(workload, steps, per_device_batch, algorithm, lr, optimizer,
                                           bucket_mb, batch_scale)
        bucket_mb = BUCKET_MB if bucket_mb is None else bucket_mb
        n = self.system.devices
        job = self._job(ratio)
        _ship_by_value(wl)
        spec = TrainSpec(wl, steps, per_device_batch, algorithm, seed, overlap, lr, optimizer, bucket_mb,
                         batch_scale)
        config = {"workload": wl.name, "steps": steps, "per_device_batch": per_device_batch,
                  "batch_scale": batch_scale, "global_batch": n * per_device_batch * batch_scale,
                  "tokens_per_sample": wl.tokens_per_sample,
                  "algorithm": algorithm, "seed": seed, "overlap": overlap, "lr": lr or wl.lr,
                  "optimizer": optimizer or wl.optimizer, "bucket_mb": bucket_mb, "clock": self.clock,
                  "dilation": job.dilation, "dtype": self.dtype, "devices": n,
                  "system": self.system.describe(), "memory_bytes": memory, "loss_floor": wl.loss_floor}
        progress = _Progress(self.actors[:n])
        try:
            res = self._gather([a.train.remote(job, spec) for a in self.actors[:n]], "training", abort=False,
                               on_poll=progress.poll)
        except DeviceError as e:  # keep what was measured: the steps every surviving device finished
            rows = progress.final(skip=e.device)
            self.close()
            survivors = [r for d, r in enumerate(rows) if d != e.device]
            e.step = min(len(r) for r in survivors) if survivors else 0
            if e.step:
                done = [r[:e.step] for r in rows]
                e.completed = TrainResult(aggregate([{"rows": r} for r in done], self.system, spec, self.dtype,
                                                    e.step), {},
                                          {**config, "completed_steps": e.step, "failed": str(e)}, done)
            raise
        result = TrainResult(aggregate(res, self.system, spec, self.dtype), res[0]["state_dict"], config,
                             [r["rows"] for r in res])
        if csv:
            result.to_csv(csv)
        return result

    def __repr__(self) -> str:
        return (f"Cluster({self.system.describe()}, clock={self.clock!r}, actors={len(self.actors)})")


class _Progress:
    """Training rows fetched from the devices while they train (they answer on a second thread),
    so that a failure loses no step already finished."""

    def __init__(self, actors):
        self.actors, self.rows, self.asked = actors, [[] for _ in actors], {}

    def poll(self) -> None:
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


def _ship_by_value(workload) -> None:
    """A user's workload may live in a module the devices cannot import (a test file, a script
    outside the package path): send its code along with it rather than by module name."""
    import sys
    for f in (workload.build_model, workload.batches, workload.loss):
        name = getattr(f, "__module__", None) or ""
        if name and not name.startswith(("emulator.", "torch")) and name in sys.modules and name != "__main__":
            ray.cloudpickle.register_pickle_by_value(sys.modules[name])


def devices_that_fit(memory_bytes: float, gpu: float = 0.0, available: bool = True) -> int:
    """Device actors the Ray cluster has room for, node by node (a device cannot straddle nodes)."""
    from ray._private import state  # per-node resources: Ray has no public call for them
    per_node = state.available_resources_per_node() if available else state.total_resources_per_node()
    fit = 0
    for res in per_node.values():
        n = min(int(res.get("memory", 0) // memory_bytes), int(res.get("CPU", 0) / CPU_PER_DEVICE + 1e-9))
        if gpu:
            n = min(n, int(res.get("GPU", 0) / gpu + 1e-9))
        fit += n
    return fit


def _check_tensors(tensors, n: int) -> None:
    if not isinstance(tensors, (list, tuple)) or len(tensors) != n:
        got = len(tensors) if isinstance(tensors, (list, tuple)) else type(tensors).__name__
        raise ValueError(f"tensors: got {got} for {n} devices; give a list with one tensor per device")
    t0 = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{i}] is a {type(t).__name__}, not a torch.Tensor")
        if t.shape != t0.shape or t.dtype != t0.dtype:
            raise ValueError(f"tensors[{i}] has shape {tuple(t.shape)} and dtype {t.dtype}, but "
                             f"tensors[0] has {tuple(t0.shape)} and {t0.dtype}; every device must "
                             "give the same shape and dtype")


def _wait_ready(ref, timeout_s: float) -> bool:
    ready, _ = ray.wait([ref], timeout=timeout_s)
    return bool(ready)


def _wait_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    for pid in pids:
        while psutil.pid_exists(pid) and time.time() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
