"""All-to-all (uneven splits) in the collective layer, and the non-sum reductions: schedule
shapes, data through the local executor against a direct reference, closed forms."""

import pytest
import torch

from relay import System
from relay.collectives import busbw_factor, predict, simulate
from relay.collectives.alltoall import layout_for, split_matrix
from relay.collectives.core import finish, prepare, reference
from relay.collectives.fabric import Fabric
from relay.collectives.local import execute
from relay.collectives.schedules import ALGORITHMS, Topology, schedule

DTYPES = [torch.float32, torch.bfloat16, torch.int64]


def uneven(world, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (world, world), generator=g).tolist()  # zeros included


def run_a2a(algorithm, tensors, splits, domain):
    world = len(tensors)
    system = System("h100", world, domain=domain)
    topo = Topology(world, domain)
    lays = [layout_for(r, world, 0, topo, algorithm, splits) for r in range(world)]
    bufs = [prepare("all_to_all", r, world, t, lays[r]) for r, t in enumerate(tensors)]
    times = execute("all_to_all", algorithm, world, 0, topo, Fabric.of(system, tensors[0].element_size()),
                    bufs, splits=splits)
    return [finish("all_to_all", r, world, b, "sum", None, lays[r]) for r, b in enumerate(bufs)], times


@pytest.mark.parametrize("world,domain", [(1, 1), (2, 1), (2, 2), (3, 3), (4, 2), (6, 3), (6, 2), (8, 4), (8, 2)])
@pytest.mark.parametrize("algorithm", ["direct", "hierarchical"])
def test_uneven_all_to_all_equals_the_reference(algorithm, world, domain):
    for i, dtype in enumerate(DTYPES):
        splits = uneven(world, seed=world + i)
        tensors = [torch.arange(sum(row)).to(dtype) + 100 * r for r, row in enumerate(splits)]
        out, _ = run_a2a(algorithm, tensors, splits, domain)
        for r, (o, ref) in enumerate(zip(out, reference("all_to_all", tensors, splits=splits))):
            assert o.dtype == dtype and torch.equal(o, ref), (algorithm, world, dtype, r)


def test_even_splits_are_shards_of_count():
    assert split_matrix(3, 7) == ((3, 2, 2),) * 3
    with pytest.raises(ValueError, match="splits = .* is invalid; give 3 rows of 3"):
        split_matrix(3, 0, [[1, 2], [3, 4]])


def test_direct_sends_every_peer_once_in_shifted_order():
    p, n = 8, 8 * 5
    for r in range(p):
        (step,) = schedule("all_to_all", "direct", r, p, n)
        assert [s.peer for s in step.sends] == [(r + k) % p for k in range(1, p)]
        assert [rv.peer for rv in step.recvs] == [(r - k) % p for k in range(1, p)]
        assert all(s.segs[0][1] - s.segs[0][0] == 5 for s in step.sends)


def test_direct_across_domains_never_sends_two_ranks_to_one_receiver_at_once():
    """On equal domains each port's queue is staggered by domain and by local index: at the k-th
    place of the scale-out (or scale-up) queue, every receiver hears from exactly one sender, and
    receives are listed in the order they arrive."""
    p, dom = 32, 8
    topo = Topology(p, dom)
    steps = {r: schedule("all_to_all", "direct", r, p, p * 2, topo)[0] for r in range(p)}
    for cls in ("up", "out"):
        same = (lambda a, b: a // dom == b // dom) if cls == "up" else (lambda a, b: a // dom != b // dom)
        queues = {r: [s.peer for s in st.sends if same(r, s.peer)] for r, st in steps.items()}
        for k in range(len(queues[0])):
            assert sorted(q[k] for q in queues.values()) == list(range(p))
        for r, st in steps.items():  # r hears from s at s's k-th place, in list order
            heard = [rv.peer for rv in st.recvs if same(r, rv.peer)]
            assert [queues[s].index(r) for s in heard] == list(range(len(heard)))


def test_hierarchical_goes_inside_the_domain_then_across():
    p, dom, n = 8, 4, 8 * 3
    for r in range(p):
        inside, across = schedule("all_to_all", "hierarchical", r, p, n, Topology(p, dom))
        assert sorted(s.peer for s in inside.sends) == [q for q in range(p) if q // dom == r // dom and q != r]
        assert [s.peer for s in across.sends] == [(r + dom) % p]  # the same local index, other domain
        assert all(len(s.segs) == p // dom for s in inside.sends)  # one block per domain
        assert all(sum(b - a for a, b in s.segs) == dom * 3 for s in across.sends)  # the domain's blocks


def test_empty_blocks_send_no_message():
    splits = [[0, 0], [5, 0]]
    assert schedule("all_to_all", "direct", 0, 2, 0, splits=splits)[0].sends == ()
    assert len(schedule("all_to_all", "direct", 1, 2, 0, splits=splits)[0].sends) == 1


def test_other_algorithms_are_refused_for_all_to_all():
    with pytest.raises(ValueError, match="'ring' does not run all_to_all; choose one of direct, hierarchical"):
        schedule("all_to_all", "ring", 0, 4, 8)


@pytest.mark.parametrize("algorithm,world,domain", [("direct", 8, 8), ("direct", 5, 5), ("direct", 16, 8),
                                                    ("direct", 12, 4), ("hierarchical", 8, 4),
                                                    ("hierarchical", 16, 4), ("hierarchical", 12, 3)])
@pytest.mark.parametrize("nbytes", [960, 960 * 2**14])
def test_virtual_time_equals_the_closed_form(algorithm, world, domain, nbytes):
    s = System("h100", world, domain=domain)
    assert simulate("all_to_all", algorithm, nbytes, s) == pytest.approx(predict("all_to_all", algorithm, nbytes, s),
                                                                       rel=1e-12)


def test_closed_forms_are_the_port_serialised_ones():
    one, two, n = System("h100", 8), System("h100", 16, domain=8), 2**24
    a1, b1, a2, b2 = two.scaleup.latency_s, 1 / two.scaleup.Bps, two.scaleout.latency_s, 1 / two.scaleout.Bps
    assert predict("all_to_all", "direct", n, one, fabric=Fabric.ideal(one)) == pytest.approx(a1 + 7 / 8 * n * b1)
    assert predict("all_to_all", "hierarchical", n, two, fabric=Fabric.ideal(two)) == pytest.approx(
        a1 + 7 / 8 * n * b1 + a2 + 1 / 2 * n * b2)
    # direct across domains: both classes at once, the slower one (7 scale-up, 8 scale-out messages)
    assert predict("all_to_all", "direct", n, two, fabric=Fabric.ideal(two)) == pytest.approx(
        max(a1 + 7 / 16 * n * b1, a2 + 8 / 16 * n * b2))
    assert busbw_factor("all_to_all", 8) == 7 / 8


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("op", ["max", "min", "product"])
def test_non_sum_reductions_equal_the_reference(algorithm, op):
    world = 6
    g = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        vals = torch.tensor([-1, 1, 2]) if op == "product" else torch.arange(-5, 6)
        tensors = [vals[torch.randint(0, len(vals), (13,), generator=g)].to(dtype) for _ in range(world)]
        system = System("h100", world, domain=3)
        bufs = [prepare("all_reduce", r, world, t) for r, t in enumerate(tensors)]
        execute("all_reduce", algorithm, world, 13, Topology(world, 3), Fabric.of(system, tensors[0].element_size()),
                bufs, op=op)
        for b, ref in zip(bufs, reference("all_reduce", tensors, op)):
            assert torch.equal(b, ref), (algorithm, op, dtype)
