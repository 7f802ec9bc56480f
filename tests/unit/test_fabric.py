"""The calibrated fabric: each new algorithm's closed form and schedule shape, the protocol split,
the port overhead, and what `auto` chooses."""

import pytest
import torch

from relay import System
from relay.collectives import Fabric, predict, resolve, simulate
from relay.collectives.closed import candidates, pipeline_chunks
from relay.collectives.core import prepare, reference
from relay.collectives.fabric import CLASSES, FabricClass
from relay.collectives.local import execute
from relay.collectives.schedules import Topology, schedule, stagger


def run_data(algorithm, system, count, chunks=None):
    """Execute with small-integer buffers; return outputs and the reference."""
    g = torch.Generator().manual_seed(count)
    world = system.devices
    tensors = [torch.randint(-8, 8, (count,), generator=g).float() for _ in range(world)]
    bufs = [prepare("all_reduce", r, world, t) for r, t in enumerate(tensors)]
    fabric = resolve("all_reduce", algorithm, count * 4, system)[1]
    execute("all_reduce", algorithm, world, count, Topology(world, system.domain), fabric, bufs, chunks=chunks)
    return bufs, reference("all_reduce", tensors)


# ---------------------------------------------------------------- nvls
@pytest.mark.parametrize("world", [5, 6, 7, 8])
@pytest.mark.parametrize("nbytes", [960 * 7 * 8, 960 * 7 * 2**16])
def test_nvls_clock_equals_its_closed_form(world, nbytes):
    s = System("h100", world)
    fabric = Fabric.of(s).with_(protocol="simple", algorithm="nvls")
    sw, c = fabric.switch_timing, fabric.up_class
    line = s.scaleup_gbps * 1e9
    closed = c.switch_base_us / 1e6 + 2 * sw.latency_s + (1 + 1 / world) * nbytes / (line * c.switch_eff)
    assert predict("all_reduce", "nvls", nbytes, s) == pytest.approx(closed, rel=1e-12)
    assert simulate("all_reduce", "nvls", nbytes, s) == pytest.approx(closed, rel=1e-9)


def test_nvls_schedule_shape_and_data():
    s = System("h100", 8)
    for rank in range(8):
        steps = schedule("all_reduce", "nvls", rank, 8, 64)
        assert len(steps) == 2 and all(st.via == "switch" for st in steps)
        assert [len(st.sends) for st in steps] == [7, 7] and [len(st.recvs) for st in steps] == [7, 7]
    for count in (1, 9, 64):
        out, ref = run_data("nvls", s, count)
        assert all(torch.equal(o, r) for o, r in zip(out, ref))


def test_nvls_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="does not run reduce_scatter; choose one of ring"):
        simulate("reduce_scatter", "nvls", 2**20, System("h100", 8))
    with pytest.raises(ValueError, match="one NVSwitch domain"):
        simulate("all_reduce", "nvls", 2**20, System("h100", 16, domain=8))
    with pytest.raises(ValueError, match="in-switch reduction"):
        simulate("all_reduce", "nvls", 2**20, System("a100", 8))  # NVLink 3: no NVLS


# ---------------------------------------------------------------- pipelined hierarchical
@pytest.mark.parametrize("world,domain", [(8, 4), (12, 4), (16, 8), (6, 2)])
def test_pipelined_hierarchical_data_equals_the_reference(world, domain):
    s = System("h100", world, domain=domain)
    for count in (1, world + 3, 7 * world + 5):
        for chunks in (1, 2, 5):
            out, ref = run_data("hier_pipelined", s, count, chunks)
            assert all(torch.equal(o, r) for o, r in zip(out, ref)), (count, chunks)


def test_pipelined_hierarchical_schedule_shape():
    """Chunk c starts stagger(p1, q) steps after chunk c-1; each chunk is 2(p1-1) + 2(q-1) steps."""
    topo = Topology(16, 4)
    p1, q, C = 4, 4, 5
    D = stagger(p1, q)
    assert D == 2 * (q - 1)
    steps = schedule("all_reduce", "hier_pipelined", 0, 16, 16 * 5 * 8, topo, chunks=C)
    assert len(steps) == (C - 1) * D + 2 * (p1 - 1) + 2 * (q - 1)
    peers = {s.peer for st in steps for s in st.sends}
    assert peers == {1, 4}  # the right neighbour inside the domain and across domains


@pytest.mark.parametrize("world,domain", [(16, 8), (32, 8), (8, 4)])
@pytest.mark.parametrize("nbytes", [3 * 2**20, 3 * 2**28])
def test_pipelined_hierarchical_clock_equals_its_closed_form(world, domain, nbytes):
    s = System("b200-hgx", world, domain=domain)
    assert simulate("all_reduce", "hier_pipelined", nbytes, s, dtype="uint8") == pytest.approx(
        predict("all_reduce", "hier_pipelined", nbytes, s), rel=1e-9)


def test_pipelining_overlaps_the_phases():
    """At large sizes the pipelined form takes about the slower phase alone, not the sum."""
    s = System("b200-hgx", 32, domain=8, scaleout_gbps=50)
    n = 2**32
    plain, piped = predict("all_reduce", "hierarchical", n, s), predict("all_reduce", "hier_pipelined", n, s)
    assert pipeline_chunks("all_reduce", "hier_pipelined", n, s) > 1
    assert piped < 0.8 * plain


# ---------------------------------------------------------------- protocols and port overhead
def test_small_messages_take_the_low_latency_protocol_and_large_ones_the_bulk_one():
    s = System("a100", 8)
    assert resolve("all_reduce", "ring", 8, s)[1].protocol == "ll"
    assert resolve("all_reduce", "ring", 2**30, s)[1].protocol == "simple"
    c = Fabric.of(s).up_class
    a = s.scaleup_latency_us / 1e6
    # 8 bytes: the LL fixed cost and 14 ring steps of latency + port overhead (bytes negligible)
    assert predict("all_reduce", "ring", 8, s) == pytest.approx(
        c.ll_base_us / 1e6 + 14 * (a + c.o_us / 1e6) + 14 * 1 / (300e9 * c.eff * c.ll_bw), rel=1e-9)
    # large: busbw tends to eff x line rate
    n = 2**34
    busbw = n / predict("all_reduce", "ring", n, s) * 2 * 7 / 8 / 1e9
    assert busbw == pytest.approx(300 * c.eff, rel=0.01)


def test_port_overhead_is_paid_per_message_of_a_fan_out():
    """Direct reduce-scatter sends p-1 messages through one port: p-1 overheads, one latency."""
    s = System("h100", 4, scaleup_latency_us=1, scaleup_gbps=1)
    f = Fabric.of(s)
    o = f.up_class.o_us * 1e-6
    n = 3 * 10**6
    t = simulate("reduce_scatter", "direct", n, s, dtype="uint8")
    tuned = resolve("reduce_scatter", "direct", n, s, f.with_(elem_bytes=1))[1]
    link = tuned.link(0, 1)[1]
    assert t == pytest.approx(tuned.base_s() + link.latency_s + 3 * (o + link.wire_s(n / 4)), rel=1e-12)


def test_a_users_latency_is_kept_over_the_fabrics():
    """MI300X's fabric has a measured latency; a latency the user sets on the system wins."""
    assert Fabric.of(System("mi300x", 8)).link(0, 1)[1].latency_s > 4e-6
    low = Fabric.of(System("mi300x", 8, scaleup_latency_us=1.0)).with_(protocol="ll")
    assert low.link(0, 1)[1].latency_s == pytest.approx(1e-6)


# ---------------------------------------------------------------- auto
def test_auto_chooses_as_the_vendor_libraries_do():
    h = System("h100", 8)
    assert resolve("all_reduce", "auto", 2**10, h)[0] == "ring"  # small: ring LL (NCCL up to ~1 MiB)
    assert resolve("all_reduce", "auto", 2**30, h)[0] == "nvls"  # large, 8 GPUs: NVLS
    assert resolve("all_reduce", "auto", 2**30, System("h100", 4))[0] == "ring"  # NVLS from 5 GPUs
    assert resolve("all_reduce", "auto", 2**30, System("b200-hgx", 5))[0] == "ring"  # B200: from 6
    assert resolve("all_gather", "auto", 2**30, h)[0] == "ring"  # NVLS is all-reduce only here
    assert resolve("all_reduce", "auto", 2**30, System("mi300x", 8))[0] == "direct"  # a full mesh
    multi = System("h100", 32, domain=8)
    assert "hier_pipelined" in candidates("all_reduce", multi, Fabric.of(multi))
    assert resolve("all_reduce", "auto", 2**32, multi)[0] == "hier_pipelined"


def test_auto_is_never_slower_than_what_it_chose_among():
    for s in (System("h100", 8), System("mi300x", 8), System("b200-hgx", 16, domain=8)):
        for n in (2**12, 2**20, 2**28):  # counts divide evenly: the closed forms are exact
            best = predict("all_reduce", "auto", n, s)
            for alg in candidates("all_reduce", s, Fabric.of(s)):
                assert best <= predict("all_reduce", alg, n, s) * (1 + 1e-12)
            assert simulate("all_reduce", "auto", n, s) == pytest.approx(best, rel=1e-9)


def test_ideal_fabric_is_the_line_rate_model():
    s = System("h100", 8)
    ideal = Fabric.ideal(s)
    assert ideal.base_s() == 0 and ideal.link(0, 1)[1].o_s == 0
    assert ideal.link(0, 1)[1].Bps == s.scaleup_gbps * 1e9


def test_every_fabric_class_is_sourced():
    for name, c in CLASSES.items():
        assert isinstance(c, FabricClass)
        assert "eff" in c.sources, name
    with pytest.raises(ValueError, match="eff = 1.5 is invalid"):
        FabricClass("bad", eff=1.5)
