"""Two-level collective algorithms as pure schedules: inside each scale-up domain, then across
domains (plain, pipelined by chunks, and reduced in the scale-out switches for all-reduce)."""

from __future__ import annotations

from relay.collectives.steps import (
    Recv,
    Send,
    Step,
    _chunks,
    _merge,
    chain_broadcast_group,
    ring_all_gather_group,
    ring_reduce_scatter_group,
    shards,
)
from relay.errors import ConfigError


# ---------------------------------------------------------------- hierarchical (two levels)
def _levels(rank, world, topology):
    if topology is None or not topology.equal_domains:
        got = "none" if topology is None else f"domain = {topology.domain} for {world} devices"
        raise ConfigError(f"algorithm 'hierarchical' needs equal scale-up domains ({got}); "
                         "choose a domain size that divides the device count, or another algorithm")
    p1 = topology.domain
    p2 = world // p1
    d, loc = divmod(rank, p1)
    intra = [d * p1 + j for j in range(p1)]  # my domain, by local index
    inter = [dd * p1 + loc for dd in range(p2)]  # same local index in every domain
    return p1, p2, d, loc, intra, inter


def hierarchical_all_reduce(rank, world, count, topology=None, **_):
    """Reduce-scatter inside the domain, all-reduce (ring) across domains, all-gather inside."""
    if world == 1 or count == 0:
        return []
    p1, p2, d, loc, intra, inter = _levels(rank, world, topology)
    blocks = shards(count, p1)
    inner = [(b,) for b in blocks]
    outer = [(s,) for s in shards(blocks[loc][1] - blocks[loc][0], p2, start=blocks[loc][0])]
    steps = ring_reduce_scatter_group(loc, intra, inner) if p1 > 1 else []
    if p2 > 1:
        steps += ring_reduce_scatter_group(d, inter, outer) + ring_all_gather_group(d, inter, outer)
    if p1 > 1:
        steps += ring_all_gather_group(loc, intra, inner)
    return steps


def stagger(p1: int, q: int) -> int:
    """Steps between the starts of consecutive chunks of the pipelined hierarchical all-reduce: a
    chunk's scale-out phase, so that the scale-out port (nearly always the slower) is never idle
    once the pipeline is full; the scale-up port then carries a few chunks' messages a step."""
    return max(2 * (q - 1), 1)


def hier_pipelined_all_reduce(rank, world, count, topology=None, chunks=None, **_):
    """The hierarchical all-reduce with its phases overlapped, as NCCL pipelines them: the buffer
    is cut into chunks, each does reduce-scatter inside the domain, ring all-reduce across, and
    all-gather inside; chunk c starts `stagger` steps after chunk c-1, so one chunk crosses the
    scale-out links while the next is reduced inside its domain."""
    return _pipelined(rank, world, count, topology, chunks, sharp=False)


def _pipelined(rank, world, count, topology, chunks, sharp: bool):
    """Chunks of the two-level all-reduce, chunk c starting c x D steps in; across domains a ring
    all-reduce (D = stagger) or the scale-out switches' reduction (two steps, D = 2)."""
    if world == 1 or count == 0:
        return []
    p1, p2, d, loc, intra, inter = _levels(rank, world, topology)
    if sharp and p2 == 1:
        raise ConfigError("algorithm 'sharp' reduces across domains in the scale-out switches; this "
                          "system is one domain: choose ring, or nvls")
    D, per = (2 if sharp else stagger(p1, p2)), []
    for c, (a, b) in enumerate(shards(count, _chunks(count, chunks))):
        blocks = shards(b - a, p1, start=a)
        inner = [(blk,) for blk in blocks]
        outer = shards(blocks[loc][1] - blocks[loc][0], p2, start=blocks[loc][0])
        steps = [Step()] * (c * D)
        steps += ring_reduce_scatter_group(loc, intra, inner) if p1 > 1 else []
        if sharp:
            steps += [_direct_group(d, inter, outer, True), _direct_group(d, inter, outer, False)]
        elif p2 > 1:
            ring = [(s,) for s in outer]
            steps += ring_reduce_scatter_group(d, inter, ring) + ring_all_gather_group(d, inter, ring)
        steps += ring_all_gather_group(loc, intra, inner) if p1 > 1 else []
        per.append(steps)
    return _merge(*per)


def _direct_group(me: int, group: list[int], segs, reduce: bool) -> Step:
    """One step among `group` (me: my position) through the "sharp" class: reduce, segs[j] goes
    straight to position j; gather, my segment goes to every other. Peers in shifted order."""
    q = len(group)
    peers = [(me + k) % q for k in range(1, q)]
    srcs = [(me - k) % q for k in range(1, q)]
    if reduce:
        return Step(tuple(Send(group[j], (segs[j],)) for j in peers),
                    tuple(Recv(group[i], (segs[me],), True) for i in srcs), via="sharp")
    return Step(tuple(Send(group[j], (segs[me],)) for j in peers),
                tuple(Recv(group[i], (segs[i],), False) for i in srcs), via="sharp")


def sharp_all_reduce(rank, world, count, topology=None, chunks=None, **_):
    """In-network reduction across domains (InfiniBand SHARP; NCCL's CollNet Direct), pipelined by
    chunks as hier_pipelined is: each chunk is reduce-scattered inside the domain (ring), its
    blocks summed in the scale-out switches and sent back to every domain, then all-gathered
    inside. The switch phase moves as a direct reduce-scatter and all-gather among the devices of
    my local index, through the "sharp" link class, which the fabric rates so that the clock
    charges the switch's traffic: each block once up, once down."""
    return _pipelined(rank, world, count, topology, chunks, sharp=True)


def hierarchical_reduce_scatter(rank, world, count, topology=None, **_):
    """Inside the domain, local index j collects shards {dd * p1 + j}; then across domains."""
    if world == 1 or count == 0:
        return []
    p1, p2, d, loc, intra, inter = _levels(rank, world, topology)
    sh = shards(count, world)
    steps = []
    if p1 > 1:
        steps += ring_reduce_scatter_group(loc, intra, [tuple(sh[dd * p1 + j] for dd in range(p2))
                                                       for j in range(p1)])
    if p2 > 1:
        steps += ring_reduce_scatter_group(d, inter, [(sh[dd * p1 + loc],) for dd in range(p2)])
    return steps


def hierarchical_all_gather(rank, world, count, topology=None, **_):
    if world == 1 or count == 0:
        return []
    p1, p2, d, loc, intra, inter = _levels(rank, world, topology)
    sh = shards(count, world)
    steps = []
    if p2 > 1:
        steps += ring_all_gather_group(d, inter, [(sh[dd * p1 + loc],) for dd in range(p2)])
    if p1 > 1:
        steps += ring_all_gather_group(loc, intra, [tuple(sh[dd * p1 + j] for dd in range(p2))
                                                   for j in range(p1)])
    return steps


def hierarchical_broadcast(rank, world, count, topology=None, root=0, chunks=None, **_):
    """Chain across domains (ranks with the root's local index), then a chain in each domain."""
    if world == 1 or count == 0:
        return []
    p1, p2, d, loc, intra, inter = _levels(rank, world, topology)
    segs = shards(count, _chunks(count, chunks))
    rd, rl = divmod(root, p1)
    steps = chain_broadcast_group(d, inter, rd, segs) if p2 > 1 and loc == rl else []
    if p1 > 1:
        steps += chain_broadcast_group(loc, intra, rl, segs)
    return steps
