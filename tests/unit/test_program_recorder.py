"""The recorder of a launched program's shared run (device/fake/launched.py), on its own: it
refuses a process group the replay could not rename, and times each collective as its members
would, all starting with it."""

from __future__ import annotations

import pytest
import torch

from relay import System
from relay.collectives.fabric import Fabric
from relay.collectives.local import execute
from relay.device.backend.collective import resolved
from relay.device.backend.engine import Work
from relay.device.fake.launched import ProgramRecorder
from relay.errors import ConfigError
from relay.kernels.clock import VirtualLane
from relay.kernels.timeline import Timeline


@pytest.fixture
def recorder():
    system = System("h100", 4, domain=2)
    rec = ProgramRecorder(0, None, system, Fabric.of(system, 4), Timeline(0.0), VirtualLane(), 5.0)
    rec.allowed = frozenset({(0, 1, 2, 3)})
    yield rec
    rec.close()


def test_groups_the_replay_cannot_rename_are_refused(recorder):
    assert recorder.group([0, 1, 2, 3]).size == 4 and recorder.group([0]).size == 1
    with pytest.raises(ConfigError, match=r"process group of devices \[0, 1\].*--parallel dp=4,tp=2"):
        recorder.group([0, 1])


def test_a_collective_is_timed_as_if_every_member_started_with_it(recorder):
    group = recorder.group([0, 1, 2, 3])
    buf = torch.empty(1 << 20)
    work = Work(recorder, [])
    recorder._issue(work, "collective", lambda ready: recorder.collective(group, "all_reduce", buf, buf.numel(),
                                                                          ready))
    work.wait()
    alg, fabric, opts = resolved(group, "all_reduce", recorder.algorithms["all_reduce"], buf.numel(), 4, None, ())
    ends = execute("all_reduce", alg, 4, buf.numel(), group.topology, fabric, start_times=(0.0,) * 4, **opts)
    assert work.end == ends[0] > 0  # (the recorder alone would have answered 0: communication free)
    assert recorder.compute.scheduled() == ends[0]  # the program's clock waited for it
    assert [e[0] for e in recorder.events] == ["issue", "wait"]  # and the replay has it to redo


def test_object_collectives_are_answered_with_this_ranks_own_value():
    """No peer answers them in a recording: a symmetric program's ranks hold what this one holds."""
    import torch.distributed as dist

    from relay.device.fake.launched import _objects_answered
    original = dist.all_gather_object
    out, box = [None] * 4, [{"seed": 7}]
    with _objects_answered():
        dist.all_gather_object(out, {"step": 3})
        dist.broadcast_object_list(box, src=0)
        with pytest.raises(ConfigError, match="scatter_object_list on a rank that is not its source"):
            dist.scatter_object_list([None], None, src=0)
    assert out == [{"step": 3}] * 4 and out[0] is not out[1]  # copies, as unpickled objects are
    assert box == [{"seed": 7}] and dist.all_gather_object is original  # restored after
