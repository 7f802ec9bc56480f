"""The driver side of the collective and matmul jobs: checks before any device runs, the call,
and the per-collective result (fidelity against the model on the wall clock)."""

from __future__ import annotations

import torch

from relay.collectives import DTYPE_BYTES, Fabric, pipeline_chunks, resolve, topology_of
from relay.collectives.local import execute
from relay.collectives.schedules import check as check_collective
from relay.collectives.schedules import schedule
from relay.device import jobs
from relay.driver.pacing import comm_ratio
from relay.errors import ConfigError
from relay.kernels.calibrate import calibrate
from relay.kernels.cost import CostModel

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


def run_matmuls(cluster, sizes: list[int], repeats) -> list[dict]:
    sizes = [int(s) for s in sizes]
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError(f"sizes = {sizes!r} is invalid; give matrix sizes >= 1")
    reps = [repeats] * len(sizes) if isinstance(repeats, int) else list(repeats)
    if len(reps) != len(sizes) or any(r < 1 for r in reps):
        raise ConfigError(f"repeats = {repeats!r} is invalid; give an int >= 1 or one per size")
    host = cluster.host or calibrate()
    models = [CostModel(chip, cluster.dtype, **cluster.efficiency) for chip in set(cluster.system.chips)]
    ratio = max(host.matmul_real_s(s) / m.matmul_cost(s, s, s).seconds for s in sizes for m in models)
    job = cluster.job(ratio)
    out = cluster.run(jobs.run_matmuls, job, sizes, reps, what="run_matmuls")
    for r in out:
        r["dilation"] = job.dilation
    return out


def collectives(cluster, primitive: str, cases: list, algorithm: str, op: str, root: int,
                chunks: int | None, repeats: int) -> list[CollectiveResult]:
    system = cluster.system
    n = system.devices
    check_collective(primitive, algorithm, allow_auto=True)
    if op not in OPS:
        raise ConfigError(f"op = {op!r} is unknown; choose 'sum' or 'avg'")
    if op != "sum" and primitive not in ("all_reduce", "reduce_scatter"):
        raise ConfigError(f"op = {op!r} does not apply to {primitive}; drop it")
    if not (isinstance(root, int) and 0 <= root < n):
        raise ConfigError(f"root = {root!r} is not a device; give 0 <= root < {n}")
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ConfigError(f"repeats = {repeats!r} is invalid; give an integer >= 1")
    per_device, biggest, shapes = [[] for _ in range(n)], 0, []
    for case in cases:
        if isinstance(case, tuple):
            numel, dtype = case
            if dtype not in DTYPE_BYTES:
                raise ConfigError(f"dtype = {dtype!r} is unknown; choose one of {', '.join(DTYPE_BYTES)}")
            shape_numel, itemsize, items = numel, DTYPE_BYTES[dtype], [case] * n
        else:
            _check_tensors(case, n)
            shape_numel, itemsize, items = case[0].numel(), case[0].element_size(), case
        count = shape_numel * (n if primitive == "all_gather" else 1)
        alg, fabric = resolve(primitive, algorithm, count * itemsize, system,
                              Fabric.of(system, itemsize, cluster.faults.link_slowdown))
        schedule(primitive, alg, 0, n, count, topology_of(system))  # refuses bad layouts
        k = chunks or pipeline_chunks(primitive, alg, count * itemsize, system)
        biggest = max(biggest, count * itemsize)
        shapes.append((count, itemsize, k, alg, fabric))
        for d in range(n):
            per_device[d].append((items[d], k))
    job = cluster.job(comm_ratio(system, biggest))
    res = cluster.run(jobs.collective, job, primitive, algorithm, each=[(c, op, root, repeats) for c in per_device],
                      what=f"{primitive} ({algorithm})")
    out = []
    for i, (count, itemsize, k, alg, fabric) in enumerate(shapes):
        rows = [res[d][i] for d in range(n)]
        times = [r["emulated_s"][-1] for r in rows]
        fidelity = 1.0
        if cluster.clock == "wall":  # how close the measured time came to the model's
            model = max(execute(primitive, alg, n, count, topology_of(system), fabric, root=root, chunks=k))
            fidelity = max(0.0, 1.0 - abs(max(times) / model - 1.0)) if model > 0 else 1.0
        out.append(CollectiveResult([r["output"] for r in rows], max(times), times,
                                    max(r["real_s"] for r in rows), fidelity))
    return out


def _check_tensors(tensors, n: int) -> None:
    if not isinstance(tensors, (list, tuple)) or len(tensors) != n:
        got = len(tensors) if isinstance(tensors, (list, tuple)) else type(tensors).__name__
        raise ConfigError(f"tensors: got {got} for {n} devices; give a list with one tensor per device")
    t0 = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"tensors[{i}] is a {type(t).__name__}, not a torch.Tensor")
        if t.shape != t0.shape or t.dtype != t0.dtype:
            raise ConfigError(f"tensors[{i}] has shape {tuple(t.shape)} and dtype {t.dtype}, but "
                             f"tensors[0] has {tuple(t0.shape)} and {t0.dtype}; every device must "
                             "give the same shape and dtype")
