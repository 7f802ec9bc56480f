"""Chunked messages (the bulk protocol's pipeline): a message moves as ceil(n / S) chunks, each
paying a handshake on the port; whole chunks run at the calibrated bulk rate, a partial chunk pays
the rest of its handshake, so bandwidth ramps with size. Chunks are a timing notion: schedules keep
one message per step, and the clock still equals the closed forms."""

from dataclasses import replace

import pytest

from relay import System
from relay.collectives import Fabric, predict, schedule, simulate
from relay.collectives.closed import closed_form
from relay.collectives.fabric import CLASSES


def simple_link(system):
    return Fabric.of(system).with_(protocol="simple").link(0, 1)[1]


def test_a_message_moves_as_pipelined_chunks_each_paying_a_handshake():
    s = System("h100", 8)
    c = CLASSES["nvlink4"]
    link = simple_link(s)
    S, h, bulk = c.chunk_kib * 1024, c.chunk_us / 1e6, s.scaleup_gbps * 1e9 * c.eff
    assert (link.chunk_B, link.chunk_s) == (S, h)
    assert [link.chunks(n) for n in (0, 1, S, S + 1, 3 * S)] == [0, 1, 1, 2, 3]
    for k in (1, 3):  # whole chunks: exactly the calibrated bulk rate, handshakes included
        assert link.wire_s(k * S) == pytest.approx(k * S / bulk, rel=1e-12)
    # a partial chunk pays its whole handshake: k h + n / raw
    n = 2.5 * S
    assert link.wire_s(n) == pytest.approx(3 * h + n / link.Bps, rel=1e-12)
    assert link.wire_s(n) > n / bulk
    # so the rate a message gets ramps up to a chunk per message
    rates = [m / link.wire_s(m) for m in (S / 64, S / 16, S / 4, S)]
    assert rates == sorted(rates) and rates[0] < 0.5 * bulk and rates[-1] == pytest.approx(bulk)


def test_low_latency_protocol_and_the_ideal_fabric_are_not_chunked():
    s = System("h100", 8)
    assert Fabric.of(s).with_(protocol="ll").link(0, 1)[1].chunk_B == 0
    ideal = Fabric.ideal(s).link(0, 1)[1]
    assert ideal.chunk_B == 0 and ideal.wire_s(10**9) == 10**9 / ideal.Bps


def test_a_handshake_longer_than_its_chunk_is_refused():
    bad = replace(CLASSES["nvlink4"], chunk_kib=1, chunk_us=100.0)
    with pytest.raises(ValueError, match="chunk_us = 100.0"):
        Fabric(Fabric.of(System("h100", 8)).up_line, None, 8, 8, up_class=bad)


S_NV = CLASSES["nvlink4"].chunk_kib * 1024


@pytest.mark.parametrize("per_step_chunks", [0.25, 1, 2.5])  # a step's message in chunks
@pytest.mark.parametrize("primitive", ["all_reduce", "reduce_scatter", "all_gather"])
@pytest.mark.parametrize("algorithm,world,domain", [("ring", 8, 8), ("direct", 8, 8), ("hierarchical", 16, 8)])
def test_clock_equals_the_closed_form_across_chunk_boundaries(per_step_chunks, primitive, algorithm, world, domain):
    s = System("h100", world, domain=domain)
    n = int(per_step_chunks * S_NV) * world
    assert simulate(primitive, algorithm, n, s, dtype="uint8") == pytest.approx(
        predict(primitive, algorithm, n, s), rel=1e-9)


def test_ring_closed_form_counts_the_chunks_of_each_step():
    """8 x H100 ring all-reduce, Simple, 2.5 chunks per step: 14 steps, each 3 handshakes."""
    s = System("h100", 8)
    f = Fabric.of(s).with_(protocol="simple", algorithm="ring")
    link = f.link(0, 1)[1]
    n = int(2.5 * S_NV) * 8
    m = n / 8
    expect = f.base_s() + 14 * (link.latency_s + link.o_s + 3 * link.chunk_s + m / link.Bps)
    assert closed_form("all_reduce", "ring", n, s, 1, f) == pytest.approx(expect, rel=1e-12)


def test_chunks_are_a_timing_notion_the_schedule_keeps_one_message_per_step():
    for count in (8 * 100, 8 * 50 * 2**20):
        steps = schedule("all_reduce", "ring", 0, 8, count)
        assert len(steps) == 14 and all(len(st.sends) == 1 and len(st.recvs) == 1 for st in steps)
