"""A launched program's role, recorded alone: `relay launch --tensors fake --shared` and
`cluster.launch(fn, tensors="fake", shared=True)` (driver/launch_shared.py replays every device).

One worker runs the program as its role's representative (rank 0 for a data-parallel / FSDP
program: every rank does the same work) with WORLD_SIZE = the system's devices, on a store of its
own (no peer joins). The engine is a `ProgramRecorder`: record.py's Recorder, which notes every
operation and its waits for the replay, and which also times each collective as if every member
started it with this device (a symmetric program's members do), so that the program's own clock
(`time.perf_counter`, CUDA events: its tps and MFU lines) reads the emulated step with its
communication, not one where communication is free. The replay's figures do not depend on that
estimate: they come from the recording alone.

A group the program makes must be one the replay can rename for every device: the whole world,
one device, or (with a `--parallel` hint) one of the plan's groups of this device; any other is
refused when the program makes it (ConfigError, naming the group).

Object collectives cannot be answered without peers. Under the recording, `all_gather_object`
and `gather_object` give this device's object for every rank, `broadcast_object_list` and
`scatter_object_list` keep the source's (this device's own: a symmetric program's ranks hold the
same values), and none of them is timed (control traffic of a few bytes; a per-device launch
times them as collectives). torchtitan 0.3.0 calls none of them on its llama3 train path
(docs/torchtitan.md).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import replace

import torch.distributed as dist
from torch.distributed import distributed_c10d

from relay.collectives.local import execute
from relay.device.backend.collective import resolved
from relay.device.backend.engine import Engine
from relay.device.backend.program import run_program
from relay.device.fake.record import Recorder
from relay.errors import ConfigError


class ProgramRecorder(Recorder):
    """The Recorder for a launched program: groups checked, collectives timed symmetrically."""

    allowed: frozenset = frozenset()  # member tuples of groups (beside one device) the replay can rename

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._timed: dict = {}  # a collective's shape -> each member's end from a common start 0

    def group(self, members):
        ms = tuple(members)
        if len(ms) > 1 and ms not in self.allowed:
            raise ConfigError(f"shared run: the program made a process group of devices {list(ms)}, which is "
                              "neither the whole world nor a group of the --parallel plan given; give the plan "
                              "its groups come from (e.g. --parallel dp=4,tp=2), or launch without --shared")
        return super().group(members)

    def collective(self, group, primitive, buf, count, ready, op="sum", algorithm=None, **options) -> float:
        super().collective(group, primitive, buf, count, ready, op, algorithm, **options)
        _, _, primitive, algorithm, count, elem, nbytes, opts, _ = self.jobs[self._running]["parts"][-1]
        key = (group.members, primitive, algorithm, count, elem, nbytes, opts)
        if key not in self._timed:
            alg, fabric, o = resolved(group, primitive, algorithm, count, elem, nbytes, opts)
            self._timed[key] = execute(primitive, alg, group.size, count, group.topology, fabric, **o)
        end = max(ready, self.comm.t) + self._timed[key][group.rank]
        self.comm.advance_to(end)
        return end

    def waited(self, work) -> None:
        Recorder.waited(self, work)  # noted for the replay ...
        Engine.waited(self, work)  # ... and held on this device's own timeline (its program's clock)


def record_launched(dev, job, program, device: int, allowed: frozenset) -> dict:
    """Run `program` as `device`, alone, recorded (a function run on a worker by the driver)."""
    made = []

    def engine(*args):
        made.append(ProgramRecorder(*args))
        made[-1].allowed = allowed
        return made[-1]
    program = _with(program, _objects_answered)
    out = run_program(dev, job, program, device=device, engine_class=engine)
    out["recording"] = made[0].recording_of()
    return out


def _with(program, context):
    return replace(program, wrap=functools.partial(_wrapped, inner=program.wrap, context=context))


@contextlib.contextmanager
def _wrapped(throttle, inner, context):
    with context(), (inner(throttle) if inner is not None else contextlib.nullcontext()):
        yield


@contextlib.contextmanager
def _objects_answered():
    """Object collectives answered locally, as the module's docstring says."""
    def all_gather_object(object_list, obj, group=None):
        object_list[:] = [copy.deepcopy(obj) for _ in object_list]

    def gather_object(obj, object_gather_list=None, dst=None, group=None, group_dst=None):
        if object_gather_list is not None:
            object_gather_list[:] = [copy.deepcopy(obj) for _ in object_gather_list]

    def broadcast_object_list(object_list, src=None, group=None, device=None, group_src=None):
        return None

    def scatter_object_list(scatter_object_output_list, scatter_object_input_list=None, src=None, group=None,
                            group_src=None):
        if scatter_object_input_list is None:
            raise ConfigError("shared run: scatter_object_list on a rank that is not its source cannot be answered "
                              "without peers; launch without --shared")
        scatter_object_output_list[0] = copy.deepcopy(scatter_object_input_list[dist.get_rank()])

    answers = {f.__name__: f for f in (all_gather_object, gather_object, broadcast_object_list, scatter_object_list)}
    saved = {name: getattr(dist, name) for name in answers}
    for name, f in answers.items():
        setattr(dist, name, f)
        setattr(distributed_c10d, name, f)
    try:
        yield
    finally:
        for name, f in saved.items():
            setattr(dist, name, f)
            setattr(distributed_c10d, name, f)
