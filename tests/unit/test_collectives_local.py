"""The local executor: data against a direct reference, times against the closed forms."""

import pytest
import torch

from relay import System
from relay.collectives import ALGORITHMS, PRIMITIVES, predict, simulate
from relay.collectives.alltoall import layout_for
from relay.collectives.core import finish, prepare, reference
from relay.collectives.fabric import Fabric
from relay.collectives.local import _lockstep, execute
from relay.collectives.schedules import SCHEDULES, Topology, schedule

PAIRS = [(p, a) for p in PRIMITIVES for a in ALGORITHMS if (p, a) in SCHEDULES]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64]


def domain_for(world):
    return next((d for d in (4, 3, 2) if world % d == 0 and d < world), world)


def run(primitive, algorithm, tensors, op="sum", root=0, domain=None, chunks=None):
    world = len(tensors)
    system = System("h100", world, domain=domain or domain_for(world))
    topo = Topology(world, system.domain)
    count = tensors[0].numel() * (world if primitive == "all_gather" else 1)
    lay = [layout_for(r, world, count, topo, algorithm) if primitive == "all_to_all" else None for r in range(world)]
    bufs = [prepare(primitive, r, world, t, lay[r]) for r, t in enumerate(tensors)]
    times = execute(primitive, algorithm, world, count, topo, Fabric.of(system, tensors[0].element_size()), bufs,
                    root=root, chunks=chunks)
    return [finish(primitive, r, world, b, op, tensors[0].shape, lay[r]) for r, b in enumerate(bufs)], times


def small_ints(world, n, dtype, seed):
    """Integers in [-8, 8): sums over 16 ranks stay exact in every dtype, so any summation order
    gives the reference bit for bit."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-8, 8, (n,), generator=g).to(dtype) for _ in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 6, 7, 8, 9, 16])
@pytest.mark.parametrize("primitive,algorithm", PAIRS)
def test_every_primitive_and_algorithm_equals_the_reference(primitive, algorithm, world):
    for i, dtype in enumerate(DTYPES):
        for count in (0, 1, world + 1, 3 * world + 2):  # empty, tiny, not divisible by world
            n = max(count // world, 1) if primitive == "all_gather" and count else count
            tensors = small_ints(world, n, dtype, seed=count + i)
            root = (count + i) % world
            out, _ = run(primitive, algorithm, tensors, root=root)
            for r, (o, ref) in enumerate(zip(out, reference(primitive, tensors, "sum", root))):
                assert o.dtype == dtype and torch.equal(o, ref), (primitive, algorithm, world, dtype, count, r)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("primitive", ["all_reduce", "reduce_scatter"])
def test_average(primitive, algorithm):
    tensors = small_ints(6, 20, torch.float32, 1) + []
    out, _ = run(primitive, algorithm, tensors, op="avg")
    ref = reference(primitive, tensors, "avg")
    assert all(torch.equal(o, r) for o, r in zip(out, ref))
    ints = small_ints(6, 20, torch.int64, 2)
    out, _ = run(primitive, algorithm, ints, op="avg")
    assert all(torch.equal(o, r) for o, r in zip(out, reference(primitive, ints, "avg")))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_random_floats_within_rounding(algorithm):
    """Real gradients are not small integers: fp32 sums in another order agree to 1e-5."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(1000, generator=g) for _ in range(8)]
    out, _ = run("all_reduce", algorithm, tensors)
    for o, r in zip(out, reference("all_reduce", tensors)):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_multidimensional_tensors_keep_their_shape():
    tensors = small_ints(4, 24, torch.float32, 3)
    shaped = [t.reshape(2, 3, 4) for t in tensors]
    out, _ = run("all_reduce", "ring", shaped)
    assert out[0].shape == (2, 3, 4)
    out, _ = run("all_gather", "ring", shaped)
    assert out[0].shape == (8, 3, 4) and torch.equal(out[0], torch.cat(shaped))


EXACT = [("ring", 8, 8), ("ring", 6, 6), ("direct", 8, 8), ("direct", 5, 5),
         ("halving_doubling", 8, 8), ("halving_doubling", 16, 16), ("hierarchical", 16, 4),
         ("hierarchical", 12, 3), ("hierarchical", 8, 8)]


@pytest.mark.parametrize("algorithm,world,domain", EXACT)
@pytest.mark.parametrize("primitive", ["all_reduce", "reduce_scatter", "all_gather"])
@pytest.mark.parametrize("nbytes", [960, 960 * 2**16])  # counts divide every world size here
def test_virtual_time_equals_the_closed_form(primitive, algorithm, world, domain, nbytes):
    system = System("h100", world, domain=domain)
    assert simulate(primitive, algorithm, nbytes, system) == pytest.approx(
        predict(primitive, algorithm, nbytes, system), rel=1e-9)


def test_chain_broadcast_equals_its_closed_form():
    system = System("h100", 8)
    for nbytes in (1024, 2**26):
        assert simulate("broadcast", "ring", nbytes, system, chunks=16) == pytest.approx(
            predict("broadcast", "ring", nbytes, system, chunks=16), rel=1e-9)


def test_closed_forms_are_the_textbook_ones():
    """On the line-rate fabric (no calibration) the closed forms are Thakur et al.'s."""
    s = System("h100", 8)
    a, b, n, p = 2.5e-6, 1 / 450e9, 2**26, 8
    ideal = Fabric.ideal(s)
    assert predict("all_reduce", "ring", n, s, fabric=ideal) == pytest.approx(2 * (p - 1) * a + 2 * (p - 1) / p * n * b)
    assert predict("all_reduce", "halving_doubling", n, s, fabric=ideal) == pytest.approx(
        6 * a + 2 * (p - 1) / p * n * b)
    h = System("h100", 16, domain=8)
    a2, b2 = 5e-6, 1 / 50e9
    assert predict("all_reduce", "hierarchical", n, h, fabric=Fabric.ideal(h)) == pytest.approx(
        2 * 7 * a + 2 * 7 / 8 * n * b + 2 * 1 * a2 + 2 * 1 / 2 * (n / 8) * b2)


def test_estimated_forms_stay_close_to_the_simulation():
    s = System("h100", 8)
    for alg in ("tree",):
        for n in (1024, 2**24):
            assert 0.7 < predict("all_reduce", alg, n, s) / simulate("all_reduce", alg, n, s) < 1.5


def test_simulate_handles_hundreds_of_ranks():
    cm = System.preset("cloudmatrix384")
    t = simulate("all_reduce", "halving_doubling", 2**24, cm)
    assert t == pytest.approx(predict("all_reduce", "halving_doubling", 2**24, cm), rel=0.3)


def test_two_runs_are_identical():
    s = System("h100", 12, domain=4)
    assert [simulate("all_reduce", a, 10**6, s) for a in ALGORITHMS] == \
        [simulate("all_reduce", a, 10**6, s) for a in ALGORITHMS]


def test_ports_serialise_a_fan_out():
    """Direct reduce-scatter: p-1 messages leave one egress port in turn (line-rate fabric)."""
    s = System("h100", 4, scaleup_latency_us=1, scaleup_gbps=1)
    n = 3 * 10**6  # 1 MB shards
    assert simulate("reduce_scatter", "direct", n, s, dtype="uint8", fabric=Fabric.ideal(s)) == pytest.approx(
        1e-6 + 3 * 10**6 / 4 / 1e9 * 3, rel=1e-12)


@pytest.mark.parametrize("world,domain", [(2, 2), (6, 3), (8, 4), (12, 4), (16, 16)])
@pytest.mark.parametrize("primitive,algorithm", PAIRS)
def test_timing_alone_equals_timing_with_data_to_the_bit(primitive, algorithm, world, domain):
    """Timing only, lockstep schedules (rings) take the vectorised path (local._lockstep): every
    rank's end equals the loop's (which runs whenever data are given), to the bit, from uneven
    start times, across domains, with a straggler's slower links and counts world does not divide."""
    system = System("h100", world, domain=domain)
    topo, fabric = Topology(world, domain), Fabric.of(system, 2, slowdown={world - 1: 1.7})
    starts = [1e-3 * ((r * 7) % 5) for r in range(world)]
    for count in (world * 3 + 1, 3 * 2**14 + 3):
        if primitive == "all_gather":
            count -= count % world
        lay = [layout_for(r, world, count, topo, algorithm) if primitive == "all_to_all" else None
               for r in range(world)]
        data = [prepare(primitive, r, world, torch.zeros(count // world if primitive == "all_gather" else count),
                        lay[r]) for r in range(world)]
        alone = execute(primitive, algorithm, world, count, topo, fabric, start_times=starts)
        assert alone == execute(primitive, algorithm, world, count, topo, fabric, data, start_times=starts)


def test_rings_take_the_lockstep_path():
    """The test above compares something: a ring's schedule is one the vectorised path takes."""
    world = 12
    for primitive in ("all_gather", "reduce_scatter", "all_reduce"):
        plans = [schedule(primitive, "ring", r, world, 1200, Topology(world, 4)) for r in range(world)]
        assert _lockstep(plans, [0.0] * world, Fabric.of(System("h100", world, domain=4))) is not None
