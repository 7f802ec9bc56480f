"""Closed forms of every schedule under a Fabric, and the choices made from them: the protocol
for a given algorithm, and the algorithm for `auto`.

With a the latency, o the per-message port overhead and b = 1 / rate of the link class that
paces the algorithm (scale-up inside one domain, scale-out across; fabric.py), A = a + o per
message, n the buffer's bytes, p devices, C pipeline chunks, and B the fabric's fixed cost:
    ring all-reduce       B + 2 (p-1) (A + n/p b)        reduce-scatter, all-gather: half of it
    direct all-reduce     B + 2 (a + (p-1) (o + n/p b))  (the p-1 messages share one port)
    nvls all-reduce       B + 2 a + (1 + 1/p) n / (switch_eff x line)
    sharp all-reduce      B + 2 (p1-1) (A1 + n/p1 b1) + 2 a2 + (n/p1) / (sharp_eff x line2)
                          (one chunk; q domains of p1: ring inside, each block up to the
                          InfiniBand switches and back; pipelined by chunks as hier_pipelined)
(n/x b stands for the wire time w(n/x) of a chunked link: core.py)
and Thakur, Rabenseifner & Gropp (2005) and NCCL's tree model for the others. Exact for the
schedules Relay runs when links are homogeneous and counts divide evenly (ring, direct, nvls,
hierarchical, hier_pipelined and sharp (sums over their steps), halving-doubling at powers of two, chain
broadcasts); the tree, the direct
broadcast and halving-doubling at other world sizes are estimates.
Flat algorithms on a multi-domain system are charged the scale-out link throughout (every ring
step waits for its slowest hop).

Choices, as NCCL's tuner makes them (src/graph/tuning.cc: the time of each algorithm and protocol
from such a model, the least one wins): `resolve` picks the protocol (LL or Simple) for an
algorithm, and for `auto` the algorithm too, among ring, nvls (where the fabric has it, for
all-reduce, in one domain of at least `switch_min_devices`), direct (on a full-mesh fabric) and
hierarchical, plain and pipelined, and sharp where the system's scale-out switches reduce
(systems of equal domains; NCCL's tuner picks CollNet the same way, by its cost model, once
SHARP is enabled). The sizes where the choice flips
follow from the calibrated figures: on 8 x H100, ring LL up to about 1 MiB, NVLS above (NCCL:
ring LL up to 1 MiB, NVLS from 2 MiB; stas00/ml-engineering). The NVLS device threshold is the
fabric's switch_min_devices (5 on H100/H200, 6 on B200, as measured).
"""

from __future__ import annotations

import math

from relay.collectives.fabric import PROTOCOLS, Fabric
from relay.collectives.schedules import ALGORITHMS, Topology, check, schedule, stagger
from relay.errors import ConfigError

MAX_CHUNKS = 64  # pipeline chunks of tree and chain algorithms, at most
AUTO = "auto"


def _bottleneck(system):
    link = system.scaleup if system.domains == 1 else system.scaleout
    return link.latency_s, 1.0 / link.Bps


def pipeline_chunks(primitive: str, algorithm: str, nbytes: float, system) -> int:
    """Chunks a pipelined algorithm (tree, chain broadcast) cuts the buffer into: the count that
    minimises its closed form, (k + d)(alpha + c n beta / k) -> k = sqrt(d c n beta / alpha), d
    being the pipeline depth. One chunk for small messages (latency-bound), more for large."""
    p = system.devices
    if algorithm in ("hier_pipelined", "sharp"):
        return _pipelined_chunks(nbytes, system, algorithm)
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


def _pipelined_chunks(nbytes: float, system, algorithm: str = "hier_pipelined") -> int:
    """Chunks of a pipelined two-level all-reduce (hier_pipelined, sharp): the power of two that
    minimises its closed form on the system's calibrated fabric (more chunks overlap more, but pay
    more steps)."""
    if system.domains == 1 or not topology_of(system).equal_domains or nbytes <= 0:
        return 1
    fabric = Fabric.of(system).with_(algorithm=algorithm)
    if algorithm == "sharp" and not fabric.sharp_allowed():
        return 1
    sharp = algorithm == "sharp"
    best = min((_hier_pipelined(float(nbytes), system, c, fabric, sharp), c)
               for c in (1, 2, 4, 8, 16, 32, MAX_CHUNKS))
    return best[1]


def _hier_pipelined(n: float, system, C: int, fabric: Fabric, sharp: bool = False) -> float:
    """Closed form of the pipelined two-level all-reduce: chunk c's phases (scale-up reduce-scatter,
    p1-1 steps; across domains a ring all-reduce, 2(q-1) steps, or with `sharp` the switches'
    reduction, 2 steps of q-1 messages; scale-up all-gather, p1-1 steps) start D steps after chunk
    c-1's (stagger, or 2). In a step where k messages share a class's port, that class takes
    k (o + x) + a (x: one message's wire time); the step takes the longer class."""
    p1, q = system.domain, system.domains
    up = fabric.link(0, 0)[1]
    if sharp:
        out, m2, L2, D = fabric.sharp_timing, q - 1, 2, 2
    else:
        out, m2, L2, D = fabric.link(0, p1)[1], 1, 2 * (q - 1), stagger(p1, q)
    x1, x2 = up.wire_s(n / C / p1), out.wire_s(n / C / p1 / q)
    L1 = p1 - 1
    total = fabric.base_s("sharp" if sharp else "hier_pipelined")
    for t in range((C - 1) * D + 2 * L1 + L2):
        ku = ko = 0
        for c in range(min(C, t // D + 1)):
            s = t - c * D
            if s < L1 or L1 + L2 <= s < 2 * L1 + L2:
                ku += 1
            elif s < L1 + L2:
                ko += 1
        step = ku * (up.o_s + x1) + up.latency_s if ku else 0.0
        if ko:
            step = max(step, ko * m2 * (out.o_s + x2) + out.latency_s)
        total += step
    return total


def topology_of(system) -> Topology:
    return Topology(system.devices, system.domain)


def closed_form(primitive: str, algorithm: str, nbytes: float, system, chunks: int, fabric: Fabric) -> float:
    """Seconds of one collective under `fabric` as given (its protocol already chosen)."""
    p, n = system.devices, float(nbytes)
    if p == 1 or n == 0:
        return 0.0
    _, link = fabric.bottleneck()
    a, o, w = link.latency_s, link.o_s, link.wire_s  # w(x): a message of x bytes on the wire
    A, B = a + o, fabric.base_s(algorithm)
    C = max(1, min(int(n), chunks))
    p2 = 1 << (p.bit_length() - 1)
    rem = p > p2
    lg = math.log2(p2)
    ar, rs_ag = primitive == "all_reduce", primitive in ("reduce_scatter", "all_gather")

    if primitive == "all_to_all":
        return B + _all_to_all(algorithm, n, system, fabric)
    if algorithm == "hier_pipelined":
        if not topology_of(system).equal_domains:
            schedule(primitive, algorithm, 0, p, 1, topology_of(system))  # raises the explanatory error
        return _hier_pipelined(n, system, C, fabric)
    if algorithm == "nvls":
        sw = fabric.switch_timing
        return B + 2 * (sw.latency_s + (p - 1) * (sw.o_s + sw.wire_s(n / p)))
    if algorithm == "sharp":
        if not topology_of(system).equal_domains:
            schedule(primitive, algorithm, 0, p, 1, topology_of(system))  # raises the explanatory error
        return _hier_pipelined(n, system, C, fabric, sharp=True)
    if algorithm == "ring":
        if ar:
            return B + 2 * (p - 1) * (A + w(n / p))
        if rs_ag:
            return B + (p - 1) * (A + w(n / p))
        return B + (p - 1) * a + (C + p - 2) * (o + w(n / C))  # chunks stream back to back
    if algorithm == "halving_doubling":
        half = sum(A + w(n / 2**i) for i in range(1, int(lg) + 1))
        if ar:
            return B + 2 * half + rem * 2 * (A + w(n))
        if rs_ag:
            return B + half + rem * (2 * A + w(n) + w(n / p))
        return B + 2 * half + rem * (A + w(n))
    if algorithm == "direct":
        one = a + (p - 1) * (o + w(n / p))
        return B + (one if rs_ag else 2 * one)
    if algorithm == "tree":
        H = math.floor(math.log2(p))
        if primitive == "broadcast":
            return B + (C + H - 1) * (A + 4 * w(n / 2 / C))
        return B + (C + 2 * H - 1) * (A + 4 * w(n / 2 / C))
    # hierarchical
    topo = topology_of(system)
    if not topo.equal_domains:
        schedule(primitive, algorithm, 0, p, 1, topo)  # raises the explanatory error
    p1, q = system.domain, system.domains
    up, out = fabric.link(0, 0)[1], (fabric.link(0, p1)[1] if q > 1 else None)
    a1, o1, w1 = up.latency_s, up.o_s, up.wire_s
    a2, o2, w2 = (out.latency_s, out.o_s, out.wire_s) if out is not None else (0.0, 0.0, lambda x: 0.0)
    if ar:
        return B + 2 * (p1 - 1) * (a1 + o1 + w1(n / p1)) + 2 * (q - 1) * (a2 + o2 + w2(n / p))
    if rs_ag:
        return B + (p1 - 1) * (a1 + o1 + w1(n / p1)) + (q - 1) * (a2 + o2 + w2(n / p))
    return B + ((q - 1) * a2 + (C + q - 2) * (o2 + w2(n / C)) if q > 1 else 0.0) + \
        ((p1 - 1) * a1 + (C + p1 - 2) * (o1 + w1(n / C)) if p1 > 1 else 0.0)


def _all_to_all(algorithm: str, n: float, system, fabric: Fabric) -> float:
    """Each rank sends n/p bytes to every other rank, and its egress port serves one message at a
    time (the receivers, in shifted order, never queue). direct: a + (p-1)(o + n/p b) in one
    domain; across domains the two link classes work side by side and the slower is taken (exact
    for equal domains; with a smaller last domain an estimate). hierarchical: p1-1 scale-up messages of n/p1, then
    q-1 scale-out messages of n/q, exact for equal domains."""
    p, p1, q = system.devices, system.domain, system.domains
    up = fabric.link(0, 0)[1]
    out = fabric.link(0, p1)[1] if q > 1 else None
    level = lambda t, k, nbytes: t.latency_s + k * (t.o_s + t.wire_s(nbytes)) if k else 0.0  # noqa: E731
    if algorithm == "direct":
        inside = level(up, min(p1, p) - 1, n / p)
        return inside if q == 1 else max(inside, level(out, p - min(p1, p), n / p))
    topo = topology_of(system)
    if not topo.equal_domains:
        schedule("all_to_all", algorithm, 0, p, 1, topo)  # raises the explanatory error
    return level(up, p1 - 1, n / p1) + (level(out, q - 1, n / q) if q > 1 else 0.0)


def candidates(primitive: str, system, fabric: Fabric) -> list[str]:
    """What `auto` chooses among on this system (see the module docstring)."""
    if primitive == "all_to_all":
        return ["direct"] + (["hierarchical"] if system.domains > 1 and topology_of(system).equal_domains else [])
    out = ["ring"]
    if fabric.domains == 1 and fabric.up_class.mesh:
        out.append("direct")
    if primitive == "all_reduce" and fabric.switch_allowed():
        out.append("nvls")
    if system.domains > 1 and topology_of(system).equal_domains:
        out.append("hierarchical")
        if primitive == "all_reduce":
            out.append("hier_pipelined")
            if fabric.sharp_allowed():
                out.append("sharp")
    return out


def resolve(primitive: str, algorithm: str, nbytes: float, system, fabric: Fabric | None = None,
            chunks: int | None = None) -> tuple[str, Fabric]:
    """The algorithm to run (`auto` resolved) and the fabric with its protocol chosen, for one
    collective of `nbytes`: the least closed-form time wins (ties: the earlier candidate)."""
    fabric = fabric if fabric is not None else Fabric.of(system)
    if algorithm == AUTO:
        check(primitive, "direct")
        algs = candidates(primitive, system, fabric)
    else:
        check(primitive, algorithm)
        if algorithm == "nvls" and not fabric.has_switch:
            raise ConfigError(f"algorithm 'nvls' needs a scale-up fabric with in-switch reduction; "
                             f"{fabric.up_class.name!r} has none: choose ring, or auto")
        if algorithm == "sharp" and not fabric.sharp_allowed():
            raise ConfigError("algorithm 'sharp' needs scale-out switches that reduce, across domains: a "
                             "system of several domains with sharp=True (--sharp) on a fabric that has "
                             "SHARP (ib-hdr, ib-ndr); choose hierarchical, or auto")
        algs = [algorithm]
    best = None
    for alg in algs:
        C = chunks or pipeline_chunks(primitive, alg, nbytes, system)
        for proto in (("simple",) if alg in ("nvls", "sharp") else PROTOCOLS[::-1]):
            f = fabric.with_(protocol=proto, algorithm=alg)
            t = closed_form(primitive, alg, nbytes, system, C, f)
            if best is None or t < best[0]:
                best = (t, alg, f)
    return best[1], best[2]


def predict(primitive: str, algorithm: str, nbytes: float, system, chunks: int | None = None,
            fabric: Fabric | None = None) -> float:
    """Closed-form seconds of one collective (algorithm may be `auto`); `fabric` defaults to the
    system's calibrated one (Fabric.ideal(system) gives the textbook line-rate model)."""
    alg, fab = resolve(primitive, algorithm, nbytes, system, fabric, chunks)
    return closed_form(primitive, alg, nbytes, system, chunks or pipeline_chunks(primitive, alg, nbytes, system), fab)


__all__ = ["ALGORITHMS", "AUTO", "candidates", "closed_form", "pipeline_chunks", "predict", "resolve",
           "topology_of"]
