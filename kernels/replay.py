"""Charging a repeated step by recorded segments instead of op by op.

Per-op charging (kernels/throttle.py) costs every aten op a Python TorchDispatchMode round trip
plus the cost model's arithmetic, which on a small model is more than the op itself. But a
training step repeats: the same ops on the same shapes, between the same *sync points* (where
something outside the compute lane reads its clock or the lane waits: a parameter's gradient
becoming ready, the end of backward, the end of the step). So:

- a step is *recorded* while it is charged per op: the throttle logs every charged op's cost,
  and each sync point closes a segment (its tag and its ops' costs, in order);
- once two consecutive recordings of steps with the same signature (the shapes and dtypes of
  the step's inputs, and anything else the caller puts in it) are identical, later steps with
  that signature are *replayed*: they run without the dispatch mode, at plain torch speed, and
  each sync point charges its recorded segment in one call (`lane.charge_all`).

Exact on the virtual clock: `VirtualLane.charge_all` adds the costs one by one, in order, and
the throttle's sums (emulated_s, flops, bytes, ops) are replayed the same way, so every sync
point reads the clock to the last bit as per-op charging would have left it.

On the wall clock the segment's ops run back to back at host speed and the lane paces once, at
the sync point that closes the segment (it sleeps off its lead there, as after the segment's
last op). Within a segment nothing sleeps, so host time that one op overran can be absorbed by
the slack of the next ops of the same segment: the overrun is measured per segment, not per op.

Falling back:
- a step whose signature has no confirmed recording is charged per op (and recorded);
- a recorded step in which an op steered (handed data to Python, or made an output whose shape
  depends on data: `relay.kernels.throttle.steers`) is never replayed, nor is any later step: its
  ops may change with the data;
- a replayed step whose sync points differ from its recording (another parameter's gradient,
  one more or one fewer) raises `ReplayError`: its ops already ran unmetered, so their cost is
  unknown. Such a model's ops depend on something no signature sees (Python state, a step
  counter); charge it per op (`Replay(enabled=False)`).
Two cases go unseen, and only in them can a replayed step's cost differ from per-op charging:
ops that change with Python state while every sync point stays in place, and data read by
`Tensor.tolist()` or `.numpy()` (on the CPU these read memory without dispatching any op).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

END = "end of step"  # the tag of the sync point that ends every step


class ReplayError(RuntimeError):
    """A replayed step did not follow its recording."""


@dataclass(frozen=True)
class Segment:
    tag: object  # the sync point that closes it
    seconds: tuple  # emulated seconds of each charged op, in order
    flops: tuple
    bytes: tuple


def signature(x) -> object:
    """Shapes, dtypes and devices of the tensors in a (nested) batch; anything else as it is."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape), x.dtype, x.device
    if isinstance(x, (list, tuple)):
        return tuple(signature(y) for y in x)
    if isinstance(x, dict):
        return tuple((k, signature(v)) for k, v in x.items())
    return x


class Replay:
    """Per-step charging for one throttle: `begin(signature)`, the step's ops inside `charged()`,
    `sync(tag)` at each sync point, `end()`."""

    KEEP = 16  # signatures remembered at most (inputs whose shapes never repeat)

    def __init__(self, throttle, enabled: bool = True):
        self.throttle = throttle
        self.enabled = enabled  # False: every step charged per op
        self.recordings = {}  # signature -> (segments, confirmed)
        self.mode = "per-op"  # of the current step: "per-op", "record" or "replay"
        self.modes = []  # of every step so far

    def begin(self, sig) -> None:
        self.sig, self.segments, self.cut = sig, [], 0
        segments, confirmed = self.recordings.get(sig, ((), False))
        if self.enabled and confirmed:
            self.mode, self.plan = "replay", segments
        else:
            self.mode = "record" if self.enabled else "per-op"
            if self.enabled:
                self.throttle.log, self.throttle.steered = [], False
        self.modes.append(self.mode)

    def charged(self):
        """Where the step's ops run: under the throttle, unless the step is replayed."""
        return contextlib.nullcontext() if self.mode == "replay" else self.throttle

    def sync(self, tag) -> None:
        """A sync point: closes the segment of ops since the last one (recording) or charges it
        (replaying). Call it before anything reads the compute lane's clock."""
        if self.mode == "record":
            log = self.throttle.log
            ops = log[self.cut:]
            self.cut = len(log)
            self.segments.append(Segment(tag, *(tuple(c) for c in zip(*ops)) if ops else ((), (), ())))
        elif self.mode == "replay":
            k = len(self.segments)
            seg = self.plan[k] if k < len(self.plan) else None
            if seg is None or seg.tag != tag:
                self.mode = "per-op"
                self.enabled = False
                expected = "nothing more" if seg is None else repr(seg.tag)
                raise ReplayError(f"sync point {k} of a replayed step was {tag!r}, its recording had {expected}: "
                                  "this model's ops change from step to step with something besides its inputs' "
                                  "shapes (Python state?). Charge it per op (TrainConfig(replay=False))")
            self.segments.append(seg)
            self._charge(seg)

    def end(self) -> None:
        self.sync(END)
        if self.mode == "replay" and len(self.segments) != len(self.plan):
            self.enabled = False
            raise ReplayError(f"a replayed step ended after {len(self.segments)} of its recording's "
                              f"{len(self.plan)} sync points; charge this model per op (TrainConfig(replay=False))")
        if self.mode != "record":
            return
        th = self.throttle
        steered, th.log = th.steered, None
        if steered:  # its ops may follow the data: per op from now on
            self.enabled, self.recordings = False, {}
            return
        segments = tuple(self.segments)
        previous, _ = self.recordings.pop(self.sig, (None, False))
        if len(self.recordings) >= self.KEEP:
            self.recordings.clear()
        self.recordings[self.sig] = (segments, segments == previous)

    def _charge(self, seg: Segment) -> None:
        th = self.throttle
        if th.sync_cuda:
            torch.cuda.synchronize()
        th.lane.charge_all(seg.seconds)
        # the throttle's sums, added in the order per-op charging adds them
        e, f, b = th.emulated_s, th.flops, th.bytes
        for s in seg.seconds:
            e += s
        for x in seg.flops:
            f += x
        for x in seg.bytes:
            b += x
        th.emulated_s, th.flops, th.bytes = e, f, b
        th.ops += len(seg.seconds)
