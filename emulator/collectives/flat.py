"""One-level collective algorithms as pure schedules: ring, tree (pipelined two binary trees),
halving-doubling (Rabenseifner), direct (one-shot, all-to-all traffic) and nvls (in-switch
reduction). The vocabulary (steps, segments, topology) is in steps.py; schedules.py chooses."""

from __future__ import annotations

from dataclasses import replace

from relay.collectives.steps import (
    Recv,
    Seg,
    Send,
    Step,
    _chunks,
    _merge,
    _step,
    chain_broadcast_group,
    ring_all_gather_group,
    ring_reduce_scatter_group,
    shards,
)
from relay.errors import ConfigError


# ---------------------------------------------------------------- ring
def ring_all_reduce(rank, world, count, topology=None, **_):
    if world == 1 or count == 0:
        return []
    group, ch = list(range(world)), [(s,) for s in shards(count, world)]
    return ring_reduce_scatter_group(rank, group, ch) + ring_all_gather_group(rank, group, ch)


def ring_reduce_scatter(rank, world, count, topology=None, **_):
    if world == 1 or count == 0:
        return []
    return ring_reduce_scatter_group(rank, list(range(world)), [(s,) for s in shards(count, world)])


def ring_all_gather(rank, world, count, topology=None, **_):
    if world == 1 or count == 0:
        return []
    return ring_all_gather_group(rank, list(range(world)), [(s,) for s in shards(count, world)])


def ring_broadcast(rank, world, count, topology=None, root=0, chunks=None, **_):
    if world == 1 or count == 0:
        return []
    return chain_broadcast_group(rank, list(range(world)), root, shards(count, _chunks(count, chunks)))


# ---------------------------------------------------------------- tree (pipelined two binary trees)
class _Tree:
    """A binary heap tree over positions 0..p-1 mapped to ranks by `rank_at`."""

    def __init__(self, rank_at: list[int]):
        p = len(rank_at)
        self.rank_at, self.pos_of = rank_at, {r: i for i, r in enumerate(rank_at)}
        self.children = [[c for c in (2 * i + 1, 2 * i + 2) if c < p] for i in range(p)]
        self.height = [0] * p
        for i in reversed(range(p)):
            self.height[i] = 1 + max((self.height[c] for c in self.children[i]), default=-1)
        self.depth = [0] * p
        for i in range(1, p):
            self.depth[i] = self.depth[(i - 1) // 2] + 1

    def schedule(self, rank: int, segs: list[Seg], reduce: bool, bcast: bool) -> list[Step]:
        """Chunk c moves up one level per step (reduce: leaves at step c, a node at step
        c + its height) and then down one level per step (broadcast: the root at step c + H)."""
        C, i = len(segs), self.pos_of[rank]
        H, h, d, kids = self.height[0], self.height[i], self.depth[i], self.children[i]
        parent = self.rank_at[(i - 1) // 2] if i else None
        up = H if reduce else 0  # steps the reduce phase shifts the broadcast by
        steps = []
        for t in range(C + (2 * H if reduce and bcast else H) + 1):
            sends, recvs = [], []
            if reduce:
                if parent is not None and 0 <= t - h < C:
                    sends.append(Send(parent, (segs[t - h],)))
                for k in kids:
                    if 0 <= t - self.height[k] < C:
                        recvs.append(Recv(self.rank_at[k], (segs[t - self.height[k]],), True))
            if bcast:
                c = t - up - d
                if kids and 0 <= c < C:
                    sends += [Send(self.rank_at[k], (segs[c],)) for k in kids]
                if parent is not None and 0 <= c + 1 < C:
                    recvs.append(Recv(parent, (segs[c + 1],), False))
            steps.append(_step(sends, recvs))
        while steps and not steps[-1].sends and not steps[-1].recvs:
            steps.pop()
        return steps


def _double_tree(rank, world, count, root, chunks, reduce, bcast):
    """Two binary heap trees, each carrying half the data, both rooted at `root`; the second lays
    the other ranks out in reverse order (rank at position i of one is at position p - i of the
    other), so the halves travel mostly different links. This is not NCCL's double binary tree:
    there the leaves of one tree are the inner nodes of the other; here a rank can be a leaf of
    both (p = 8: rank 4), and the root is inner in both."""
    others = [(root + k) % world for k in range(1, world)]
    a = _Tree([root] + others)
    b = _Tree([root] + others[::-1])
    half = count // 2
    C = _chunks(max(half, 1), chunks)
    sa = a.schedule(rank, shards(half, C), reduce, bcast) if half else []
    sb = b.schedule(rank, shards(count - half, C, start=half), reduce, bcast)
    return _merge(sa, sb)


def tree_all_reduce(rank, world, count, topology=None, chunks=None, **_):
    if world == 1 or count == 0:
        return []
    return _double_tree(rank, world, count, 0, chunks, reduce=True, bcast=True)


# NCCL has no tree reduce-scatter or all-gather; Relay's are a tree all-reduce (all-gather on
# zero-filled buffers, which a sum leaves exact), paying the all-reduce's cost.
tree_reduce_scatter = tree_all_reduce
tree_all_gather = tree_all_reduce


def tree_broadcast(rank, world, count, topology=None, root=0, chunks=None, **_):
    if world == 1 or count == 0:
        return []
    return _double_tree(rank, world, count, root, chunks, reduce=False, bcast=True)


# ---------------------------------------------------------------- halving-doubling (Rabenseifner)
class _HD:
    """Non-power-of-two handling: with p2 the largest power of two <= world and rem = world - p2,
    the first 2*rem ranks pair up (even folds into odd) and p2 'virtual' ranks remain. Virtual
    rank v stands for ranks {2v, 2v+1} when v < rem, else {v + rem}: contiguous shard blocks."""

    def __init__(self, world: int, count: int):
        self.p2 = 1 << (world.bit_length() - 1)
        self.rem = world - self.p2
        self.sh = shards(count, world)

    def vrank(self, r: int):
        if r < 2 * self.rem:
            return r // 2 if r % 2 else None
        return r - self.rem

    def real(self, v: int) -> int:
        return 2 * v + 1 if v < self.rem else v + self.rem

    def block(self, lo: int, hi: int) -> tuple[Seg, ...]:
        """Elements of virtual ranks [lo, hi)."""
        first = 2 * lo if lo < self.rem else lo + self.rem
        last = 2 * hi - 1 if hi <= self.rem else hi - 1 + self.rem
        return ((self.sh[first][0], self.sh[last][1]),)

    def halving(self, v: int) -> list[Step]:
        """Recursive halving reduce-scatter: v ends with the sum of block(v, v+1)."""
        steps, lo, hi, mask = [], 0, self.p2, self.p2 // 2
        while mask:
            mid, partner = lo + (hi - lo) // 2, self.real(v ^ mask)
            keep, give = ((lo, mid), (mid, hi)) if v & mask == 0 else ((mid, hi), (lo, mid))
            steps.append(_step([Send(partner, self.block(*give))], [Recv(partner, self.block(*keep), True)]))
            lo, hi = keep
            mask //= 2
        return steps

    def doubling(self, v: int) -> list[Step]:
        """Recursive doubling all-gather: v starts with block(v, v+1), ends with all."""
        steps, lo, hi, mask = [], v, v + 1, 1
        while mask < self.p2:
            partner = v ^ mask
            theirs = (lo + mask, hi + mask) if v & mask == 0 else (lo - mask, hi - mask)
            steps.append(_step([Send(self.real(partner), self.block(lo, hi))],
                               [Recv(self.real(partner), self.block(*theirs), False)]))
            lo, hi = min(lo, theirs[0]), max(hi, theirs[1])
            mask *= 2
        return steps


def _hd(rank, world, count, fold_all: bool, halve: bool, double: bool, unfold_all: bool):
    hd = _HD(world, count)
    v, every = hd.vrank(rank), ((0, count),)
    own = (hd.sh[rank],)
    steps = []
    if hd.rem:  # fold the extra ranks in: all data (to reduce) or just the own shard (to gather)
        if rank < 2 * hd.rem:
            segs = every if fold_all else own
            steps.append(_step([Send(rank + 1, segs)]) if v is None else
                         _step(recvs=[Recv(rank - 1, segs if fold_all else (hd.sh[rank - 1],), fold_all)]))
        else:
            steps.append(Step())
    if v is not None:
        steps += (hd.halving(v) if halve else []) + (hd.doubling(v) if double else [])
    if hd.rem:  # hand the extra ranks their result: all data, or just their shard
        if rank < 2 * hd.rem:
            segs = every if unfold_all else (hd.sh[rank - 1 if v is not None else rank],)
            steps.append(_step([Send(rank - 1, segs)]) if v is not None else
                         _step(recvs=[Recv(rank + 1, segs, False)]))
    while steps and not steps[-1].sends and not steps[-1].recvs:
        steps.pop()
    return steps


def halving_doubling_all_reduce(rank, world, count, topology=None, **_):
    if world == 1 or count == 0:
        return []
    return _hd(rank, world, count, fold_all=True, halve=True, double=True, unfold_all=True)


def halving_doubling_reduce_scatter(rank, world, count, topology=None, **_):
    if world == 1 or count == 0:
        return []
    return _hd(rank, world, count, fold_all=True, halve=True, double=False, unfold_all=False)


def halving_doubling_all_gather(rank, world, count, topology=None, **_):
    if world == 1 or count == 0:
        return []
    return _hd(rank, world, count, fold_all=False, halve=False, double=True, unfold_all=True)


def halving_doubling_broadcast(rank, world, count, topology=None, root=0, **_):
    """Binomial scatter then recursive-doubling all-gather over the first p2 ranks counted from
    the root (van de Geijn); the remaining ranks then get everything from rank u - p2."""
    if world == 1 or count == 0:
        return []
    p2 = 1 << (world.bit_length() - 1)
    u = (rank - root) % world
    real = lambda x: (x + root) % world  # noqa: E731
    blocks = shards(count, p2)
    span = lambda lo, hi: ((blocks[lo][0], blocks[hi - 1][1]),)  # noqa: E731
    steps = []
    if u < p2:
        mask = p2 // 2
        while mask:  # scatter: holders of [u, u + 2 mask) give the upper half to u + mask
            if u % (2 * mask) == 0:
                steps.append(_step([Send(real(u + mask), span(u + mask, u + 2 * mask))]))
            elif u % (2 * mask) == mask:
                steps.append(_step(recvs=[Recv(real(u - mask), span(u, u + mask), False)]))
            else:
                steps.append(Step())
            mask //= 2
        lo, hi, mask = u, u + 1, 1
        while mask < p2:  # recursive doubling all-gather of the blocks
            partner = u ^ mask
            theirs = (lo + mask, hi + mask) if u & mask == 0 else (lo - mask, hi - mask)
            steps.append(_step([Send(real(partner), span(lo, hi))],
                               [Recv(real(partner), span(*theirs), False)]))
            lo, hi = min(lo, theirs[0]), max(hi, theirs[1])
            mask *= 2
        if u + p2 < world:
            steps.append(_step([Send(real(u + p2), ((0, count),))]))
    else:
        steps = [_step(recvs=[Recv(real(u - p2), ((0, count),), False)])]
    while steps and not steps[-1].sends and not steps[-1].recvs:
        steps.pop()
    return steps


# ---------------------------------------------------------------- direct (all-to-all)
def _direct_rs(rank, world, sh):
    """One step: shard j goes straight to rank j; peers in shifted order (r+1, r+2, ...)."""
    peers = [(rank + k) % world for k in range(1, world)]
    return [_step([Send(j, (sh[j],)) for j in peers],
                  [Recv((rank - k) % world, (sh[rank],), True) for k in range(1, world)])]


def _direct_ag(rank, world, sh, skip=None):
    peers = [(rank + k) % world for k in range(1, world) if (rank + k) % world != skip]
    srcs = [(rank - k) % world for k in range(1, world)] if rank != skip else []
    return [_step([Send(j, (sh[rank],)) for j in peers], [Recv(i, (sh[i],), False) for i in srcs])]


def direct_all_reduce(rank, world, count, topology=None, **_):
    if world == 1 or count == 0:
        return []
    sh = shards(count, world)
    return _direct_rs(rank, world, sh) + _direct_ag(rank, world, sh)


def direct_reduce_scatter(rank, world, count, topology=None, **_):
    if world == 1 or count == 0:
        return []
    return _direct_rs(rank, world, shards(count, world))


def direct_all_gather(rank, world, count, topology=None, **_):
    if world == 1 or count == 0:
        return []
    return _direct_ag(rank, world, shards(count, world))


def direct_broadcast(rank, world, count, topology=None, root=0, **_):
    """The root scatters shard j to rank j, then the others exchange their shards directly."""
    if world == 1 or count == 0:
        return []
    sh = shards(count, world)
    if rank == root:
        first = _step([Send((root + k) % world, (sh[(root + k) % world],)) for k in range(1, world)])
    else:
        first = _step(recvs=[Recv(root, (sh[rank],), False)])
    return [first] + _direct_ag(rank, world, sh, skip=root)


# ---------------------------------------------------------------- nvls (in-switch reduction)
def nvls_all_reduce(rank, world, count, topology=None, **_):
    """NVLink SHARP: every device's shard j is summed in the switch and multicast back. The data
    move as a direct reduce-scatter then a direct all-gather; every message goes through the
    "switch" link class, which the fabric rates so that the clock charges the switch's traffic,
    (1 + 1/p) n per device (closed form in closed.py). One scale-up domain only."""
    if world == 1 or count == 0:
        return []
    if topology is not None and topology.domains > 1:
        raise ConfigError(f"algorithm 'nvls' reduces inside one NVSwitch domain; this system has "
                         f"{topology.domains} domains of {topology.domain}: choose ring or hierarchical")
    sh = shards(count, world)
    return [replace(st, via="switch") for st in _direct_rs(rank, world, sh) + _direct_ag(rank, world, sh)]
