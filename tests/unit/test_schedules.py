"""Shapes of schedules: message counts and peers, independent of data."""

import math

import pytest

from relay.collectives.schedules import ALGORITHMS, PRIMITIVES, SCHEDULES, Topology, schedule


def sends(primitive, algorithm, rank, world, count=1000, domain=None, **kw):
    steps = schedule(primitive, algorithm, rank, world, count, Topology(world, domain or world), **kw)
    return [s for step in steps for s in step.sends], steps


@pytest.mark.parametrize("p", [2, 3, 5, 8, 16])
def test_ring_all_reduce_sends_2p_minus_2_messages_to_one_neighbour(p):
    for r in range(p):
        out, steps = sends("all_reduce", "ring", r, p)
        assert len(steps) == 2 * (p - 1) and len(out) == 2 * (p - 1)
        assert {s.peer for s in out} == {(r + 1) % p}
    # the peers form one ring through every rank
    nxt, seen = 0, []
    for _ in range(p):
        seen.append(nxt)
        nxt = sends("all_reduce", "ring", nxt, p)[0][0].peer
    assert sorted(seen) == list(range(p)) and nxt == 0


@pytest.mark.parametrize("p", [2, 4, 8, 16])
def test_halving_doubling_power_of_two_takes_2_log2_p_steps_with_distinct_partners(p):
    for r in range(p):
        out, steps = sends("all_reduce", "halving_doubling", r, p, count=4800)
        assert len(steps) == 2 * int(math.log2(p))
        partners = [s.peer for s in out]
        assert sorted(set(partners)) == sorted(r ^ (1 << k) for k in range(int(math.log2(p))))
        sizes = [s.segs[0][1] - s.segs[0][0] for s in out]
        assert sizes[0] == 4800 // 2 and sum(sizes[: len(sizes) // 2]) == 4800 * (p - 1) // p


@pytest.mark.parametrize("p", [3, 5, 6, 7])
def test_halving_doubling_other_sizes_fold_the_extra_ranks(p):
    p2 = 1 << (p.bit_length() - 1)
    extras = [r for r in range(2 * (p - p2)) if r % 2 == 0]
    for r in extras:  # an extra rank only hands its data in and gets the result back
        out, steps = sends("all_reduce", "halving_doubling", r, p)
        assert [s.peer for s in out] == [r + 1] and len(steps) == 2


@pytest.mark.parametrize("p", [2, 5, 8])
def test_direct_sends_p_minus_1_messages_to_every_peer_in_one_step_each_phase(p):
    for r in range(p):
        out, steps = sends("all_reduce", "direct", r, p)
        assert len(steps) == 2
        assert sorted(s.peer for s in steps[0].sends) == [q for q in range(p) if q != r]


def test_hierarchical_keeps_inner_phases_in_the_domain():
    p, d = 8, 4
    for r in range(p):
        out, steps = sends("all_reduce", "hierarchical", r, p, domain=d)
        inner = [s.peer for s in out if s.peer // d == r // d]
        outer = [s.peer for s in out if s.peer // d != r // d]
        assert len(inner) == 2 * (d - 1) and len(outer) == 2 * (p // d - 1)
        assert all(q % d == r % d for q in outer)  # across domains: same local index only


def test_hierarchical_refuses_unequal_domains():
    with pytest.raises(ValueError, match=r"needs equal scale-up domains \(domain = 4 for 10 devices\)"):
        schedule("all_reduce", "hierarchical", 0, 10, 100, Topology(10, 4))


def test_tree_is_logarithmic_in_depth():
    out, steps = sends("all_reduce", "tree", 0, 16, chunks=1)
    assert len(steps) <= 2 * int(math.log2(16)) + 1
    for r in range(16):  # each rank talks to at most 3 peers per tree
        assert len({s.peer for s in sends("all_reduce", "tree", r, 16, chunks=1)[0]}) <= 6


def test_chain_broadcast_pipelines_chunks():
    out, steps = sends("broadcast", "ring", 0, 4, chunks=5)
    assert len(out) == 5 and {s.peer for s in out} == {1}
    assert len(sends("broadcast", "ring", 3, 4, chunks=5)[0]) == 0  # the chain's end only receives


@pytest.mark.parametrize("primitive,algorithm", [(p, a) for p in PRIMITIVES for a in ALGORITHMS
                                                 if (p, a) in SCHEDULES])
def test_trivial_cases_have_no_steps(primitive, algorithm):
    assert schedule(primitive, algorithm, 0, 1, 100) == []
    assert schedule(primitive, algorithm, 0, 4, 0) == []


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="algorithm = 'rings' is unknown"):
        schedule("all_reduce", "rings", 0, 4, 10)
    with pytest.raises(ValueError, match="primitive = 'allreduce' is unknown"):
        schedule("allreduce", "ring", 0, 4, 10)


@pytest.mark.parametrize("p", [2, 3, 5, 8, 13])
def test_the_two_trees_are_mirror_images_over_the_non_root_ranks(p):
    # the property docs/design.md claims: both trees rooted at the root, the second with the other
    # ranks in reverse order (position i of one is position p - i of the other); and, unlike
    # NCCL's double binary tree, a rank may be a leaf of both
    from relay.collectives.schedules import _Tree
    for root in (0, p - 1):
        others = [(root + k) % p for k in range(1, p)]
        a, b = _Tree([root] + others), _Tree([root] + others[::-1])
        assert a.rank_at[0] == b.rank_at[0] == root
        assert sorted(a.rank_at) == sorted(b.rank_at) == list(range(p))
        assert all(b.pos_of[r] == p - a.pos_of[r] for r in others)
    if p == 8:
        leaf = lambda t, r: not t.children[t.pos_of[r]]  # noqa: E731
        a, b = _Tree(list(range(8))), _Tree([0] + list(range(7, 0, -1)))
        assert leaf(a, 4) and leaf(b, 4)
