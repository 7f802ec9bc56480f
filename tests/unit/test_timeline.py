"""relay.kernels.timeline: a host lane issuing kernels onto streams, by hand."""

import random

import pytest

from relay.kernels.clock import VirtualLane
from relay.kernels.timeline import DEFAULT, Timeline


def test_one_stream_is_a_compute_lane_to_the_bit():
    rng = random.Random(0)
    costs = [rng.choice([4e-6, rng.random() * 1e-3, 3e-6]) for _ in range(5000)]
    lane, tl = VirtualLane(), Timeline(launch_s=4e-6)
    lane.charge_all(costs)
    tl.charge_all(costs)
    assert tl.now() == lane.t and tl.measure() == lane.t  # bit-equal, not approximately
    assert tl.host < tl.now()  # the host ran ahead of the device


def test_a_side_stream_overlaps_the_compute_stream():
    tl = Timeline(launch_s=1.0)
    tl.charge(10.0)  # compute [0, 10]; the host is at 1 after issuing it
    assert tl.streams[DEFAULT] == 10.0 and tl.host == 1.0
    tl.apply("use", 7)
    tl.charge(5.0)  # issued at host 1 on its own stream: runs [1, 6], beside the compute
    tl.apply("record", 100, 7)
    tl.apply("use", DEFAULT)
    assert tl.streams[7] == 6.0 and tl.events[100] == 6.0
    assert tl.apply("wait_event", DEFAULT, 100) == 0.0  # done long before the compute stream needs it
    tl.apply("use", 7)
    tl.charge(20.0)  # [6, 26]
    tl.apply("record", 101, 7)
    tl.apply("use", DEFAULT)
    assert tl.apply("wait_event", DEFAULT, 101) == 16.0  # the compute stream waits, 10 -> 26
    assert tl.waited_s == 16.0
    tl.charge(1.0)
    assert tl.now() == 27.0 and tl.measure() == 27.0


def test_wait_stream_orders_a_stream_after_another():
    tl = Timeline(launch_s=0.5)
    tl.charge(3.0)  # [0, 3]
    assert tl.apply("wait_stream", 2, DEFAULT) == 0.0  # stream 2 waits (not the default: no gap counted)
    tl.apply("use", 2)
    tl.charge(1.0)  # issued at host 0.5, but its stream waited for 3
    assert tl.streams[2] == 4.0


def test_host_syncs_join_the_host_to_the_streams():
    tl = Timeline(launch_s=1e-6)
    tl.charge(1.0)
    assert tl.host == 1e-6
    tl.host_sync()  # .item(): the host waits for the current stream
    assert tl.host == tl.now()
    tl.charge(1.0)
    assert tl.host == pytest.approx(1.0 + 2e-6)  # issued after the sync
    tl.apply("use", 3)
    tl.charge(5.0)
    tl.apply("sync", None)  # synchronize(): every stream
    assert tl.host == max(tl.streams.values())


def test_the_launch_queue_bounds_how_far_the_host_runs_ahead():
    tl = Timeline(launch_s=1.0, queue_depth=4)
    for _ in range(10):
        tl.charge(100.0)
    # kernel k starts at 100 k; the host issues kernel k once kernel k - 4 has started
    assert tl.host == 100 * (9 - 4) + 1
    assert tl.now() == 100 * 10


def test_a_listener_sees_every_change_and_replays_it_exactly():
    notes, a = [], Timeline(launch_s=2.0)
    a.listener = lambda name, args: notes.append(("timeline", name, args))
    script = [("k", 5.0), ("use", 4), ("k", 3.0), ("record", 9, 4), ("use", 0), ("k", 1.0),
              ("wait_event", 0, 9), ("sync", None), ("k", 2.0)]
    events = []
    for step in script:
        if step[0] == "k":
            a.charge(step[1])
            events.append(("seg", [step[1]]))
        else:
            a.apply(step[0], *step[1:])
            events.append(notes[-1])
    b = Timeline(launch_s=2.0)
    for e in events:
        b.charge_all(e[1]) if e[0] == "seg" else b.apply(e[1], *e[2])
    assert (b.host, dict(b.streams), b.events, b.waited_s) == (a.host, dict(a.streams), a.events, a.waited_s)
