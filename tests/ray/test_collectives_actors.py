"""Collectives between real actors over gloo: data against a direct reference, and virtual
times against the local executor (which must agree exactly)."""

import pytest
import torch

from relay import System
from relay.collectives import ALGORITHMS, PRIMITIVES, pipeline_chunks, simulate
from relay.collectives.core import reference
from relay.collectives.schedules import SCHEDULES

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64]


def system_for(world):
    """Worlds with a proper divisor get two levels, so hierarchical is really hierarchical."""
    domain = next((d for d in (4, 3, 2) if world % d == 0 and d < world), world)
    return System("h100", world, domain=domain)


def cases_for(primitive, world, seed):
    """Small integers in every dtype (sums exact in any order), awkward element counts."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for i, dtype in enumerate(DTYPES):
        for count in (1, 2 * world + 1):
            n = max(count // world, 1) if primitive == "all_gather" else count
            cases.append([torch.randint(-8, 8, (n,), generator=g).to(dtype) for _ in range(world)])
    return cases


@pytest.mark.parametrize("world", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("primitive", PRIMITIVES)
def test_every_algorithm_between_actors_equals_the_reference(cluster, primitive, world):
    system = system_for(world)
    cluster.configure(system, clock="virtual")
    root = world - 1
    for algorithm in [a for a in ALGORITHMS if (primitive, a) in SCHEDULES]:
        cases = cases_for(primitive, world, seed=world)
        results = cluster.collectives(primitive, cases, algorithm, root=root)
        for case, res in zip(cases, results):
            for d, (o, ref) in enumerate(zip(res.outputs, reference(primitive, case, "sum", root))):
                assert o.dtype == ref.dtype and torch.equal(o, ref), (algorithm, d, case[0].dtype)
        # the actors' virtual time equals the local executor's, exactly
        for case, res in zip(cases, results):
            nbytes = case[0].numel() * case[0].element_size() * (world if primitive == "all_gather" else 1)
            dtype = str(case[0].dtype).split(".")[1]
            assert res.emulated_s == simulate(primitive, algorithm, nbytes, system, dtype=dtype,
                                              root=root), (algorithm, dtype)


def test_average_between_actors(cluster):
    tensors = [torch.full((10,), float(d)) for d in range(4)]
    out, _ = cluster.all_reduce(tensors, op="avg")
    assert all(torch.equal(o, torch.full((10,), 1.5)) for o in out)
    out, _ = cluster.reduce_scatter([torch.arange(8.0)] * 4, op="avg", algorithm="direct")
    assert [o.tolist() for o in out] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_large_messages_agree_with_the_local_executor_and_repeat_identically(cluster, algorithm):
    cluster.configure(System("h100", 8, domain=4))
    case = (3 * 2**18 + 5, "float32")
    a = cluster.collectives("all_reduce", [case], algorithm)[0]
    b = cluster.collectives("all_reduce", [case], algorithm)[0]
    assert a.emulated_s == b.emulated_s == simulate("all_reduce", algorithm, case[0] * 4, cluster.system)
    assert all(torch.equal(o, torch.full((case[0],), 8.0)) for o in a.outputs)


def test_scale_out_links_slow_the_ring(cluster):
    case = (2**18, "float32")
    cluster.configure(System("h100", 8, domain=8))
    one = cluster.collectives("all_reduce", [case])[0].emulated_s
    cluster.configure(System("h100", 8, domain=4))
    two = cluster.collectives("all_reduce", [case])[0].emulated_s
    # 2 of the 8 ring hops now cross 50 GB/s, 5 us scale-out links instead of 450 GB/s, 2.5 us ones;
    # the ring's 14 steps each pass one hop, so about a quarter of them pay the slow link
    assert two > 1.4 * one
    assert two == simulate("all_reduce", "ring", 2**20, cluster.system)


@pytest.mark.parametrize("bad,match", [
    (dict(tensors=[torch.ones(3), torch.ones(4), torch.ones(3), torch.ones(3)]),
     r"tensors\[1\] has shape \(4,\) .* every device must give the same shape"),
    (dict(tensors=[torch.ones(3)] * 3), "got 3 for 4 devices"),
    (dict(op="max"), "op = 'max' is unknown"),
    (dict(algorithm="hierarchical", system=System("h100", 4, domain=3)), "needs equal scale-up domains"),
])
def test_bad_collective_calls_are_refused_before_running(cluster, bad, match):
    if "system" in bad:
        cluster.configure(bad.pop("system"))
    tensors = bad.pop("tensors", [torch.ones(3)] * 4)
    with pytest.raises(ValueError, match=match):
        cluster.all_reduce(tensors, **bad)


def test_wall_clock_collective_matches_virtual_in_data(cluster):
    tensors = [torch.full((1000,), float(d)) for d in range(4)]
    cluster.configure(clock="wall")
    res = cluster.all_reduce(tensors, algorithm="halving_doubling")
    assert all(torch.equal(o, torch.full((1000,), 6.0)) for o in res.outputs)
    assert res.emulated_s > 0 and 0 <= res.fidelity <= 1


def test_pipeline_chunks_grow_with_size():
    s = System("h100", 8)
    assert pipeline_chunks("all_reduce", "tree", 64, s) == 1
    assert pipeline_chunks("all_reduce", "tree", 2**28, s) > 8
