"""Collectives: schedules (pure), the fabric (link model), the local executor, closed forms.

    predict(primitive, algorithm, nbytes, system)   closed-form seconds
    simulate(primitive, algorithm, nbytes, system)  the local executor's emulated seconds

`nbytes` is the size of the whole buffer, as in nccl-tests: the all-reduce or broadcast buffer,
the reduce-scatter input, the all-gather output, each rank's all-to-all input (even splits:
n/p bytes to every rank). `algorithm` may be "auto" (the vendor
libraries' choice, closed.py). Both take `fabric=`: by default the system's calibrated fabric
(Fabric.of(system)); Fabric.ideal(system) is the line-rate textbook model.
"""

from __future__ import annotations

from relay.collectives.closed import AUTO, pipeline_chunks, predict, resolve, topology_of
from relay.collectives.fabric import Fabric
from relay.collectives.local import execute
from relay.collectives.schedules import ALGORITHMS, PRIMITIVES, SWITCH_ALGORITHMS, Topology, check, schedule

__all__ = ["ALGORITHMS", "AUTO", "PRIMITIVES", "SWITCH_ALGORITHMS", "Fabric", "Topology", "busbw_factor",
           "pipeline_chunks", "predict", "resolve", "schedule", "simulate", "topology_of"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4, "int64": 8, "float64": 8,
               "uint8": 1, "int8": 1}


def busbw_factor(primitive: str, world: int) -> float:
    """nccl-tests' bus-bandwidth factor: busbw = algbw x factor."""
    check(primitive, "direct")
    if primitive == "all_reduce":
        return 2 * (world - 1) / world
    if primitive in ("reduce_scatter", "all_gather", "all_to_all"):
        return (world - 1) / world
    return 1.0


def simulate(primitive: str, algorithm: str, nbytes: int, system, dtype: str = "float32",
             fabric: Fabric | None = None, **options) -> float:
    """Emulated seconds of one collective on `system`, from the local executor (no data moved;
    fine for hundreds of ranks in one process). options: root, chunks, splits (all_to_all)."""
    elem = DTYPE_BYTES[dtype]
    count = -(-int(nbytes) // elem)
    if primitive == "all_gather":  # every rank contributes an equal shard
        count = -(-count // system.devices) * system.devices
    fabric = (fabric if fabric is not None else Fabric.of(system)).with_(elem_bytes=elem)
    size = count * elem  # what chooses: the buffer; for an uneven all-to-all, the mean input (as devices do)
    if primitive == "all_to_all" and options.get("splits") is not None:
        size = sum(map(sum, options["splits"])) / system.devices * elem
    # the protocol (and an `auto` algorithm) is chosen at the default chunking, as the actors do
    algorithm, fabric = resolve(primitive, algorithm, size, system, fabric)
    options.setdefault("chunks", pipeline_chunks(primitive, algorithm, size, system))
    times = execute(primitive, algorithm, system.devices, count, topology_of(system), fabric, **options)
    return max(times)
