"""All-to-all schedules, with uneven splits: rank i sends splits[i][j] elements to rank j.

A rank's buffer (see `layout`) is [input | staging | output]: the input holds the blocks for
ranks 0..world-1 in order, the output receives the blocks from ranks 0..world-1 in order, and
staging (hierarchical only) holds blocks passing through on their way to another domain. The
block a rank keeps for itself is copied by the data helpers (core.prepare), not sent.

    direct        one step: every rank sends each peer its block, peers in shifted order
                  (r+1, r+2, ...; across equal domains shifted by domain, then by local index),
                  so that no two ranks start on the same receiver
    hierarchical  two steps, as the expert-parallel libraries for NVL72 and CloudMatrix do:
                  (1) inside the scale-up domain, rank (d, l) sends rank (d, j) everything bound
                  for local index j of every domain; (2) across domains, rank (d, l) sends rank
                  (e, l) everything domain d holds for it. p1 - 1 scale-up messages of n/p1 and
                  p2 - 1 scale-out messages of n/p2 per rank, instead of p - 1 of n/p.

Messages and segments of zero elements are left out (both ends know every split). With no
`splits`, rank i sends rank j the j-th balanced shard of `count`.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.collectives.hierarchical import _levels
from relay.collectives.steps import Recv, Send, Step, Topology, shards
from relay.errors import ConfigError


def split_matrix(world: int, count: int, splits=None) -> tuple[tuple[int, ...], ...]:
    """splits[i][j] (elements rank i sends rank j), checked; even shards of `count` if None."""
    if splits is None:
        sizes = tuple(b - a for a, b in shards(count, world))
        return (sizes,) * world
    rows = tuple(tuple(int(x) for x in row) for row in splits)
    if len(rows) != world or any(len(r) != world for r in rows) or any(x < 0 for r in rows for x in r):
        raise ConfigError(f"splits = {splits!r} is invalid; give {world} rows of {world} element "
                         "counts >= 0 (row i: what rank i sends to each rank)")
    return rows


@dataclass(frozen=True)
class Layout:
    """Where one rank's blocks sit in its buffer (element offsets)."""
    send_at: tuple[int, ...]  # block bound for rank j, in the input
    recv_at: tuple[int, ...]  # block from rank i, in the output
    stage: dict  # (src, dst) -> a block passing through this rank (hierarchical)
    input: tuple[int, int]  # [start, stop) of the input
    output: tuple[int, int]  # [start, stop) of the output
    size: int  # buffer elements
    row: tuple[int, ...]  # elements this rank sends to each rank
    column: tuple[int, ...]  # elements this rank receives from each rank


def _offsets(sizes, start: int) -> tuple[int, ...]:
    out, at = [], start
    for n in sizes:
        out.append(at)
        at += n
    return tuple(out)


def layout(rank: int, world: int, S, topology: Topology | None = None, staged: bool = False) -> Layout:
    n_in = sum(S[rank])
    stage, at = {}, n_in
    if staged:
        p1 = topology.domain
        d, loc = divmod(rank, p1)
        for j in range(p1):  # blocks of my domain's other members, bound for my rail elsewhere
            src = d * p1 + j
            for e in range(world // p1):
                if src != rank and e != d:
                    stage[src, e * p1 + loc] = at
                    at += S[src][e * p1 + loc]
    column = tuple(S[i][rank] for i in range(world))
    return Layout(_offsets(S[rank], 0), _offsets(column, at), stage, (0, n_in), (at, at + sum(column)),
                  at + sum(column), S[rank], column)


def layout_for(rank: int, world: int, count: int, topology: Topology | None, algorithm: str,
               splits=None) -> Layout:
    """The buffer layout the schedule of `algorithm` expects on `rank`."""
    return layout(rank, world, split_matrix(world, count, splits), topology, algorithm == "hierarchical")


def _message(peer: int, blocks, recv: bool):
    """A Send or Recv of the non-empty (offset, length) blocks, or None if all are empty."""
    segs = tuple((a, a + n) for a, n in blocks if n)
    if not segs:
        return None
    return Recv(peer, segs, False) if recv else Send(peer, segs)


def _step(msgs) -> list[Step]:
    sends = tuple(m for m in msgs if isinstance(m, Send))
    recvs = tuple(m for m in msgs if isinstance(m, Recv))
    return [Step(sends, recvs)] if sends or recvs else []


def _peers(rank: int, world: int, topology: Topology | None, sign: int) -> list[int]:
    """The peers `rank` sends to (sign +1) or receives from (sign -1), in order: shifted inside the
    domain and, on equal domains, across them too (domain offset, then local offset), so that at
    every position of a port's queue each receiver hears from one sender only."""
    if topology is None or topology.domains == 1 or not topology.equal_domains:
        return [(rank + sign * k) % world for k in range(1, world)]
    p1, q = topology.domain, topology.domains
    d, loc = divmod(rank, p1)
    return [(d + sign * e) % q * p1 + (loc + sign * j) % p1 for e in range(q) for j in range(p1) if e or j]


def direct_all_to_all(rank, world, count, topology=None, splits=None, **_):
    if world == 1:
        return []
    S = split_matrix(world, count, splits)
    L = layout(rank, world, S)
    msgs = [_message(j, [(L.send_at[j], S[rank][j])], recv=False) for j in _peers(rank, world, topology, 1)]
    msgs += [_message(i, [(L.recv_at[i], S[i][rank])], recv=True) for i in _peers(rank, world, topology, -1)]
    return _step(msgs)


def hierarchical_all_to_all(rank, world, count, topology=None, splits=None, **_):
    if world == 1:
        return []
    p1, p2, d, loc, intra, inter = _levels(rank, world, topology)
    S = split_matrix(world, count, splits)
    L = layout(rank, world, S, topology, staged=True)
    # inside the domain: to (d, j), my blocks for rank j of every domain (its own go to its output)
    one = []
    for k in range(1, p1):
        j, i = (loc + k) % p1, (loc - k) % p1
        one.append(_message(intra[j], [(L.send_at[e * p1 + j], S[rank][e * p1 + j]) for e in range(p2)], False))
        src = intra[i]
        one.append(_message(src, [(L.recv_at[src] if e == d else L.stage[src, e * p1 + loc], S[src][e * p1 + loc])
                                  for e in range(p2)], True))
    # across domains: to (e, loc), what my domain holds for it (my own block and the staged ones)
    two = []
    for k in range(1, p2):
        e, f = (d + k) % p2, (d - k) % p2
        dst = inter[e]
        two.append(_message(dst, [(L.send_at[dst] if j == loc else L.stage[intra[j], dst], S[intra[j]][dst])
                                  for j in range(p1)], False))
        two.append(_message(inter[f], [(L.recv_at[f * p1 + j], S[f * p1 + j][rank]) for j in range(p1)], True))
    return _step(one) + _step(two)
