"""The vocabulary of collective schedules: (rank, world, count, topology) -> list of steps.

No processes, no tensors. A rank's buffer is a flat array of `count` elements; a message carries
one or more element ranges ("segments") of it. In each step a rank posts its sends (which read the
buffer as it was at the start of the step) and its receives; when all have completed, each
received message is added into (reduce) or copied over (copy) its segments, in list order.
The k-th message from rank i to rank j matches the k-th receive that j posts from i.

Primitive semantics (shards: `count` split into `world` balanced, contiguous parts, the first
count % world parts one element longer):
    all_reduce      every rank ends with the elementwise sum of all buffers
    reduce_scatter  rank r ends with the sum over ranks of shard r (the rest is scratch)
    all_gather      rank r starts with shard r filled; every rank ends with all shards
    broadcast       every rank ends with the root's buffer
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.errors import ConfigError

Seg = tuple[int, int]  # [start, stop) in elements


@dataclass(frozen=True)
class Send:
    peer: int
    segs: tuple[Seg, ...]


@dataclass(frozen=True)
class Recv:
    peer: int
    segs: tuple[Seg, ...]
    reduce: bool  # True: add into the segments; False: copy over them


@dataclass(frozen=True)
class Step:
    sends: tuple[Send, ...] = ()
    recvs: tuple[Recv, ...] = ()
    via: str = ""  # "switch": every message through the in-switch reduction class; "sharp": messages
    # between domains through the scale-out switches' reduction (inside a domain: scale-up); "": by domains


@dataclass(frozen=True)
class Topology:
    world: int
    domain: int  # ranks per scale-up domain (the last domain may be smaller)

    def __post_init__(self):
        if self.world < 1 or self.domain < 1:
            raise ConfigError(f"topology: world = {self.world}, domain = {self.domain}; both must be >= 1")

    @property
    def domains(self) -> int:
        return -(-self.world // self.domain)

    @property
    def equal_domains(self) -> bool:
        return self.world % self.domain == 0


def shards(count: int, parts: int, start: int = 0) -> list[Seg]:
    """`count` elements from `start` split into `parts` balanced contiguous segments."""
    base, extra = divmod(count, parts)
    out, at = [], start
    for i in range(parts):
        n = base + (i < extra)
        out.append((at, at + n))
        at += n
    return out


def seg_len(segs) -> int:
    return sum(b - a for a, b in segs)


def _merge(*schedules: list[Step]) -> list[Step]:
    """Run schedules side by side: step t of the result holds step t of each (and its `via`)."""
    out = []
    for t in range(max((len(s) for s in schedules), default=0)):
        parts = [s[t] for s in schedules if t < len(s)]
        vias = {p.via for p in parts if p.via}
        if len(vias) > 1:
            raise ValueError(f"cannot merge steps through different link classes {sorted(vias)}")
        out.append(Step(sum((p.sends for p in parts), ()), sum((p.recvs for p in parts), ()),
                        vias.pop() if vias else ""))
    return out


def _step(sends=(), recvs=()) -> Step:
    return Step(tuple(sends), tuple(recvs))


# ---------------------------------------------------------------- ring (and chain) building blocks
def ring_reduce_scatter_group(me: int, group: list[int], chunks: list[tuple[Seg, ...]]) -> list[Step]:
    """Ring reduce-scatter among `group` (ranks in ring order; `me` is my position): position j
    ends with the sum of chunks[j]. p - 1 steps, one message to the right neighbour each."""
    p = len(group)
    right, left = group[(me + 1) % p], group[(me - 1) % p]
    return [_step([Send(right, chunks[(me - k - 1) % p])], [Recv(left, chunks[(me - k - 2) % p], True)])
            for k in range(p - 1)]


def ring_all_gather_group(me: int, group: list[int], chunks: list[tuple[Seg, ...]]) -> list[Step]:
    """Ring all-gather among `group`: position j starts with chunks[j]; all end with all."""
    p = len(group)
    right, left = group[(me + 1) % p], group[(me - 1) % p]
    return [_step([Send(right, chunks[(me - k) % p])], [Recv(left, chunks[(me - k - 1) % p], False)])
            for k in range(p - 1)]


def chain_broadcast_group(me: int, group: list[int], root: int, segs: list[Seg]) -> list[Step]:
    """Pipelined chain from group position `root` through the group: chunk c leaves the root at
    step c and moves one hop per step. len(segs) + p - 2 steps."""
    p, C = len(group), len(segs)
    v = (me - root) % p  # my distance from the root along the chain
    nxt, prv = group[(me + 1) % p], group[(me - 1) % p]
    steps = []
    for t in range(C + p - 2):
        sends = [Send(nxt, (segs[t - v],))] if v < p - 1 and 0 <= t - v < C else []
        recvs = [Recv(prv, (segs[t - v + 1],), False)] if v > 0 and 0 <= t - v + 1 < C else []
        steps.append(_step(sends, recvs))
    return steps


def _chunks(count: int, chunks: int | None) -> int:
    return max(1, min(count, chunks or 1))
