"""Collectives: schedules (pure), the local executor, closed-form costs.

    predict(primitive, algorithm, nbytes, system)   closed-form alpha-beta seconds
    simulate(primitive, algorithm, nbytes, system)  the local executor's emulated seconds

`nbytes` is the size of the whole buffer, as in nccl-tests: the all-reduce or broadcast buffer,
the reduce-scatter input, the all-gather output, each rank's all-to-all input (even splits).
"""

from __future__ import annotations

import math

from emulator.collectives.core import link_function
from emulator.collectives.local import execute
from emulator.collectives.schedules import ALGORITHMS, PRIMITIVES, Topology, check, schedule

__all__ = ["ALGORITHMS", "PRIMITIVES", "Topology", "busbw_factor", "pipeline_chunks", "predict",
           "schedule", "simulate", "topology_of"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4, "int64": 8, "float64": 8,
               "uint8": 1, "int8": 1}
MAX_CHUNKS = 64  # pipeline chunks of tree and chain algorithms, at most


def _bottleneck(system):
    link = system.scaleup if system.domains == 1 else system.scaleout
    return link.latency_s, 1.0 / link.Bps


def pipeline_chunks(primitive: str, algorithm: str, nbytes: float, system) -> int:
    """Chunks a pipelined algorithm (tree, chain broadcast) cuts the buffer into: the count that
    minimises its closed form, (k + d)(alpha + c n beta / k) -> k = sqrt(d c n beta / alpha), d
    being the pipeline depth. One chunk for small messages (latency-bound), more for large."""
    p = system.devices
    if algorithm not in ("tree", "ring", "hierarchical") or p < 3:
        return 1
    if algorithm == "tree":
        depth = math.floor(math.log2(p)) * (1 if primitive == "broadcast" else 2) - 1
        c = 2.0
    elif primitive == "broadcast":
        depth = (max(system.domain, system.domains) if algorithm == "hierarchical" else p) - 2
        c = 1.0
    else:
        return 1
    a, b = _bottleneck(system)
    k = math.sqrt(max(depth, 0) * c * nbytes * b / a) if a > 0 else MAX_CHUNKS
    return int(min(MAX_CHUNKS, max(1, round(k))))


def topology_of(system) -> Topology:
    return Topology(system.devices, system.domain)


def busbw_factor(primitive: str, world: int) -> float:
    """nccl-tests' bus-bandwidth factor: busbw = algbw x factor."""
    check(primitive, "direct")
    if primitive == "all_reduce":
        return 2 * (world - 1) / world
    if primitive in ("reduce_scatter", "all_gather", "all_to_all"):
        return (world - 1) / world
    return 1.0


def simulate(primitive: str, algorithm: str, nbytes: int, system, dtype: str = "float32",
             **options) -> float:
    """Emulated seconds of one collective on `system`, from the local executor (no data moved;
    fine for hundreds of ranks in one process). options: root, chunks."""
    elem = DTYPE_BYTES[dtype]
    count = -(-int(nbytes) // elem)
    if primitive in ("all_gather", "all_to_all"):  # equal shards from (to) every rank
        count = -(-count // system.devices) * system.devices
    options.setdefault("chunks", pipeline_chunks(primitive, algorithm, count * elem, system))
    times = execute(primitive, algorithm, system.devices, count, topology_of(system),
                    link_function(system), elem, **options)
    return max(times)


def predict(primitive: str, algorithm: str, nbytes: float, system, chunks: int | None = None) -> float:
    """Closed-form alpha-beta seconds (Thakur, Rabenseifner & Gropp 2005; NCCL's tree model).
    Exact for the schedules Relay runs when links are homogeneous and counts divide evenly
    (ring, direct, hierarchical, halving-doubling at powers of two, chain broadcasts); the tree
    and halving-doubling at other world sizes are estimates.
    Flat algorithms on a multi-domain system are charged the scale-out link throughout (every
    ring step waits for its slowest hop)."""
    check(primitive, algorithm)
    p, n = system.devices, float(nbytes)
    if p == 1 or n == 0:
        return 0.0
    a, b = _bottleneck(system)
    C = max(1, min(int(n), chunks or pipeline_chunks(primitive, algorithm, n, system)))
    p2 = 1 << (p.bit_length() - 1)
    rem = p > p2
    lg = math.log2(p2)
    ar, rs_ag = primitive == "all_reduce", primitive in ("reduce_scatter", "all_gather")
    if primitive == "all_to_all":
        return _all_to_all(algorithm, n, system)

    if algorithm == "ring":
        if ar:
            return 2 * (p - 1) * (a + n / p * b)
        if rs_ag:
            return (p - 1) * (a + n / p * b)
        return (p - 1) * a + (C + p - 2) * n / C * b  # chunks stream back to back
    if algorithm == "halving_doubling":
        half = lg * a + (p2 - 1) / p2 * n * b
        if ar:
            return 2 * half + rem * 2 * (a + n * b)
        if rs_ag:
            return half + rem * (2 * a + n * b + n / p * b)
        return 2 * half + rem * (a + n * b)
    if algorithm == "direct":
        one = a + (p - 1) / p * n * b
        return one if rs_ag else 2 * one
    if algorithm == "tree":
        H = math.floor(math.log2(p))
        if primitive == "broadcast":
            return (C + H - 1) * (a + 2 * n / C * b)
        return (C + 2 * H - 1) * (a + 2 * n / C * b)
    # hierarchical
    topo = topology_of(system)
    if not topo.equal_domains:
        schedule(primitive, algorithm, 0, p, 1, topo)  # raises the explanatory error
    p1, q = system.domain, system.domains
    up, out = system.scaleup, system.scaleout
    a1, b1 = up.latency_s, 1.0 / up.Bps
    a2, b2 = (out.latency_s, 1.0 / out.Bps) if out is not None else (0.0, 0.0)
    if ar:
        return 2 * (p1 - 1) * (a1 + n / p1 * b1) + 2 * (q - 1) * (a2 + n / p * b2)
    if rs_ag:
        return (p1 - 1) * (a1 + n / p1 * b1) + (q - 1) * (a2 + n / p * b2)
    return ((q - 1) * a2 + (C + q - 2) * n / C * b2 if q > 1 else 0.0) + \
        ((p1 - 1) * a1 + (C + p1 - 2) * n / C * b1 if p1 > 1 else 0.0)


def _all_to_all(algorithm: str, n: float, system) -> float:
    """Each rank sends a block of n/p to every other rank; a port serves one message at a time.
    direct: p - 1 messages through the egress port, the last arriving alpha after it is
    drained. hierarchical: p1 - 1 scale-up messages of n/p1, then p2 - 1 scale-out ones of n/p2.
    Exact for one domain (direct) and equal domains (hierarchical) with n divisible by p; direct
    over several domains sends on both link classes at once and is an estimate (the slower)."""
    p, p1, q = system.devices, system.domain, system.domains
    up, out = system.scaleup, system.scaleout
    a1, b1 = up.latency_s, 1.0 / up.Bps
    a2, b2 = (out.latency_s, 1.0 / out.Bps) if out is not None else (0.0, 0.0)
    if algorithm == "direct":
        inside = a1 + (min(p1, p) - 1) / p * n * b1
        return inside if q == 1 else max(inside, a2 + (p - p1) / p * n * b2)
    topo = topology_of(system)
    if not topo.equal_domains:
        schedule("all_to_all", algorithm, 0, p, 1, topo)  # raises the explanatory error
    return (a1 + (p1 - 1) / p1 * n * b1 if p1 > 1 else 0.0) + (a2 + (q - 1) / q * n * b2 if q > 1 else 0.0)
