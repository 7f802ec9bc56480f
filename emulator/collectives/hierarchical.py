"""Two-level collective algorithms as pure schedules: inside each scale-up domain, then across
domains (plain, and pipelined by chunks for all-reduce)."""

from __future__ import annotations

from emulator.collectives.steps import (
    Step,
    _chunks,
    _merge,
    chain_broadcast_group,
    ring_all_gather_group,
    ring_reduce_scatter_group,
    shards,
)
from emulator.errors import ConfigError


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
    if world == 1 or count == 0:
        return []
    p1, p2, d, loc, intra, inter = _levels(rank, world, topology)
    D, per = stagger(p1, p2), []
    for c, (a, b) in enumerate(shards(count, _chunks(count, chunks))):
        blocks = shards(b - a, p1, start=a)
        inner = [(blk,) for blk in blocks]
        outer = [(s,) for s in shards(blocks[loc][1] - blocks[loc][0], p2, start=blocks[loc][0])]
        steps = [Step()] * (c * D)
        steps += ring_reduce_scatter_group(loc, intra, inner) if p1 > 1 else []
        if p2 > 1:
            steps += ring_reduce_scatter_group(d, inter, outer) + ring_all_gather_group(d, inter, outer)
        steps += ring_all_gather_group(loc, intra, inner) if p1 > 1 else []
        per.append(steps)
    return _merge(*per)


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
