"""SHARP-style in-network reduction across InfiniBand (`sharp`, NCCL's CollNet): off unless the
System says its scale-out switches reduce; its closed form, its schedule's shape and data, and
`auto` choosing it where it is fastest, as NCCL's tuner does."""

import pytest
import torch

from relay import System
from relay.collectives import Fabric, pipeline_chunks, predict, resolve, schedule, simulate
from relay.collectives.closed import candidates, closed_form
from relay.collectives.core import prepare, reference
from relay.collectives.fabric import CLASSES
from relay.collectives.local import execute
from relay.collectives.schedules import Topology


def sharp_system(devices=32, domain=8, chip="h100"):
    return System(chip, devices, domain=domain, sharp=True)


def test_sharp_closed_form_one_chunk():
    """q domains of p1: ring reduce-scatter and all-gather inside, each block up to the switches
    and back once: B + 2 (p1-1)(a1 + o1 + w1(n/p1)) + 2 a2 + (n/p1) / (sharp_eff x line)."""
    s = sharp_system(32, 8)
    f = Fabric.of(s).with_(protocol="simple", algorithm="sharp")
    up, sh = f.link(0, 1)[1], f.sharp_timing
    n, p1 = 8 * 4 * 2**20, 8
    line = s.scaleout_gbps * 1e9
    expect = (f.base_s() + 2 * (p1 - 1) * (up.latency_s + up.o_s + up.wire_s(n / p1))
              + 2 * sh.latency_s + n / p1 / (CLASSES["ib-ndr"].sharp_eff * line))
    assert closed_form("all_reduce", "sharp", n, s, 1, f) == pytest.approx(expect, rel=1e-12)
    assert simulate("all_reduce", "sharp", n, s, dtype="uint8", chunks=1) == pytest.approx(expect, rel=1e-9)


@pytest.mark.parametrize("devices,domain", [(16, 8), (32, 8), (64, 8), (8, 1), (12, 4)])
@pytest.mark.parametrize("nbytes", [3 * 2**20, 3 * 2**28])
def test_sharp_clock_equals_its_closed_form(devices, domain, nbytes):
    s = sharp_system(devices, domain)
    assert simulate("all_reduce", "sharp", nbytes, s, dtype="uint8") == pytest.approx(
        predict("all_reduce", "sharp", nbytes, s), rel=1e-9)


def test_sharp_schedule_shape():
    """One chunk: p1-1 ring steps inside, two switch steps (q-1 messages each, to the devices of
    the same local index, through the "sharp" class), p1-1 ring steps inside. Chunk c starts 2c
    steps in."""
    topo, p1, q = Topology(32, 8), 8, 4
    for rank in (0, 13):
        steps = schedule("all_reduce", "sharp", rank, 32, 32 * 64, topo, chunks=1)
        assert len(steps) == 2 * (p1 - 1) + 2
        mid = steps[p1 - 1:p1 + 1]
        assert all(st.via == "sharp" and len(st.sends) == q - 1 and len(st.recvs) == q - 1 for st in mid)
        assert {s.peer % p1 for st in mid for s in st.sends} == {rank % p1}
        assert all(len(st.sends) == 1 and not st.via for st in steps[:p1 - 1] + steps[p1 + 1:])
        assert len(schedule("all_reduce", "sharp", rank, 32, 32 * 64, topo, chunks=5)) == \
            2 * (5 - 1) + 2 * (p1 - 1) + 2


@pytest.mark.parametrize("devices,domain", [(8, 4), (12, 4), (16, 8), (6, 1)])
def test_sharp_data_equals_the_reference(devices, domain):
    s = sharp_system(devices, domain)
    fabric = resolve("all_reduce", "sharp", 4 * 100, s)[1]
    for count in (1, devices + 3, 7 * devices + 5):
        for chunks in (1, 3):
            g = torch.Generator().manual_seed(count)
            tensors = [torch.randint(-8, 8, (count,), generator=g).float() for _ in range(devices)]
            bufs = [prepare("all_reduce", r, devices, t) for r, t in enumerate(tensors)]
            execute("all_reduce", "sharp", devices, count, Topology(devices, domain), fabric, bufs, chunks=chunks)
            assert all(torch.equal(o, r) for o, r in zip(bufs, reference("all_reduce", tensors))), (count, chunks)


def test_sharp_is_off_unless_the_system_has_it():
    plain = System("h100", 32, domain=8)
    assert "sharp" not in candidates("all_reduce", plain, Fabric.of(plain))
    with pytest.raises(ValueError, match="sharp=True"):
        predict("all_reduce", "sharp", 2**20, plain)
    with pytest.raises(ValueError, match="one domain"):
        schedule("all_reduce", "sharp", 0, 8, 64, Topology(8, 8))
    with pytest.raises(ValueError, match="does not run all_gather; choose one of ring"):
        simulate("all_gather", "sharp", 2**20, sharp_system())
    with pytest.raises(ValueError, match="no in-network reduction"):  # RoCE: no SHARP figures
        Fabric.of(System("h100", 32, domain=8, sharp=True), scaleout="roce")
    with pytest.raises(ValueError, match="sharp = 'yes'"):
        System("h100", 32, domain=8, sharp="yes")


def test_auto_takes_sharp_where_it_is_fastest():
    """Across 2 nodes a ring crosses the network once each way and the pipelined hierarchical
    all-reduce keeps up; from 4 nodes the switches' reduction (each block up and back once) wins
    at large sizes, as NCCL's CollNet does."""
    assert resolve("all_reduce", "auto", 2**30, sharp_system(16, 8))[0] == "hier_pipelined"
    for devices in (32, 64):
        s = sharp_system(devices, 8)
        assert "sharp" in candidates("all_reduce", s, Fabric.of(s))
        assert resolve("all_reduce", "auto", 2**30, s)[0] == "sharp"
        assert pipeline_chunks("all_reduce", "sharp", 2**30, s) > 1
        assert predict("all_reduce", "auto", 2**30, s) < predict("all_reduce", "hier_pipelined", 2**30, s)
