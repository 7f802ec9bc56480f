"""Steps of an unmodified program (`relay launch script.py`, `cluster.launch(fn)`): every
optimizer.step() marks the end of one, through torch's global optimizer-step hooks, so a script
needs no change for per-step figures.

At each mark the device notes its compute lane's emulated time, the compute, communication and
exposed communication charged so far, the work the script reported (relay.dist.report) and
the bytes of the model state the optimizer steps: its parameters, their gradients and its state
(each storage once; a DTensor by its local shard). `rows()` turns the marks into one row per
step; `aggregate()` (driver side) turns every device's rows into one row per step of the program.

Step 0 runs from the program's start, so it includes the set-up (process group, model, DDP's
broadcast); what runs after the last step (evaluation, teardown) is in no step, only in the
device's total. An optimizer stepped from inside another's step (ZeroRedundancyOptimizer's inner
one) marks nothing of its own; two optimizers stepped one after the other mark two steps.
"""

from __future__ import annotations

import time

from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

STEP_COLUMNS = ["device", "step", "step_s", "compute_s", "comm_s", "exposed_comm_s", "other_s",
                "samples_per_s", "tokens_per_s", "samples", "tokens", "model_state_bytes", "wall_s"]
UNITS = {"model_state_bytes": "bytes of the stepped optimizer's parameters, gradients and state (real "
         "tensors, at the step's end; activations not included)"}
_KINDS = ("samples", "tokens")


class StepMarks:
    """While entered, marks a step at every optimizer.step() of this process (one device's)."""

    def __init__(self, lane, throttle, engine, counts: dict):
        self.lane = lane  # the compute lane: a step ends when its optimizer's last op is charged
        self.throttle, self.engine = throttle, engine
        self.counts = counts  # relay.dist.report's running totals (Context.counts)
        self.marks: list[dict] = []
        self.depth = 0  # optimizer steps under way (a wrapper's step runs its inner optimizer's)
        self.handles = []
        self.spans_seen, self.comm_s = 0, 0.0  # engine.spans summed so far (it only grows)
        self.end_counts: dict = {}
        self.r0 = time.time()

    def __enter__(self):
        self.r0 = time.time()
        self.handles = [register_optimizer_step_pre_hook(self._pre),
                        register_optimizer_step_post_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.end_counts = dict(self.counts)

    def _pre(self, optimizer, args, kwargs) -> None:
        self.depth += 1

    def _post(self, optimizer, args, kwargs) -> None:
        self.depth -= 1
        if self.depth > 0:
            return
        self.engine.mark("step")  # (a shared run's recording notes it: driver/launch_shared.py)
        spans = self.engine.spans
        new = spans[self.spans_seen:]  # appended by the communication thread; a slice is a snapshot
        self.spans_seen += len(new)
        self.comm_s += sum(e - s for _, s, e, _ in new)
        self.marks.append({"end_s": self.lane.measure(), "compute_s": self.throttle.emulated_s,
                           "comm_s": self.comm_s, "exposed_comm_s": self.engine.exposed_s,
                           "wall_s": time.time() - self.r0, "counts": dict(self.counts),
                           "model_state_bytes": model_state_bytes(optimizer)})

    def rows(self, device: int) -> list[dict]:
        """One row per step (emulated seconds, but wall_s: real), with the samples and tokens the
        script reported in it (None where it reported none at all).

        Which step a report belongs to: scripts report either just before optimizer.step() or
        just after it. Reports made before the first step mean the former (a step's reports are
        those before its mark); none before it, the latter (those after its mark, up to the next
        one or the program's end)."""
        marks, out = self.marks, []
        prev = {"end_s": 0.0, "compute_s": 0.0, "comm_s": 0.0, "exposed_comm_s": 0.0, "wall_s": 0.0}
        for k, m in enumerate(marks):
            row = {"device": device, "step": k, "end_s": m["end_s"], "step_s": _step_s(m["end_s"], prev["end_s"]),
                   **{f: m[f] - prev[f] for f in ("compute_s", "comm_s", "exposed_comm_s", "wall_s")},
                   "model_state_bytes": m["model_state_bytes"]}
            out.append(_with_rates(row, {kind: self._reported(kind, k) for kind in _KINDS}))
            prev = m
        return out

    def _reported(self, kind: str, k: int):
        if kind not in self.end_counts:
            return None
        at = [m["counts"].get(kind, 0) for m in self.marks]
        if at[0] > 0:  # reported before stepping
            return at[k] - (at[k - 1] if k else 0)
        return (at[k + 1] if k + 1 < len(at) else self.end_counts[kind]) - at[k]


def model_state_bytes(optimizer) -> int:
    """Bytes of the optimizer's parameters, their gradients and its state, each storage once."""
    seen, total = set(), 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            tensors = [p, p.grad, *optimizer.state.get(p, {}).values()]
            for t in tensors:
                if not hasattr(t, "untyped_storage"):
                    continue  # None, or a plain number in the state (e.g. a step count)
                if isinstance(t, DTensor):
                    t = t._local_tensor
                storage = t.untyped_storage()
                if storage._cdata not in seen:  # the storage itself (fake and meta ones have no address)
                    seen.add(storage._cdata)
                    total += storage.nbytes()
    return total


def aggregate(per_device: list[list[dict]]) -> list[dict]:
    """One row per step of the program from every device's rows: a step ends when its last
    device ends (as `relay run` counts steps); compute and communication are the devices' mean,
    samples and tokens their sum, model state the most loaded device's."""
    out, prev = [], 0.0
    for k in range(max((len(r) for r in per_device), default=0)):
        rows = [r[k] for r in per_device if len(r) > k]
        end = max(r["end_s"] for r in rows)
        row = {"step": k, "devices": len(rows), "step_s": _step_s(end, prev),
               **{f: sum(r[f] for r in rows) / len(rows) for f in ("compute_s", "comm_s", "exposed_comm_s")},
               "model_state_bytes": max(r["model_state_bytes"] for r in rows),
               "wall_s": max(r["wall_s"] for r in rows)}
        work = {kind: [r[kind] for r in rows if r[kind] is not None] for kind in _KINDS}
        out.append(_with_rates(row, {kind: sum(known) if known else None for kind, known in work.items()}))
        prev = end
    return out


def _step_s(end: float, prev_end: float) -> float:
    """A step's emulated time from its end and the previous step's (restart_clocks() restarts the
    lanes at 0: the step then runs from that 0)."""
    return end - prev_end if end >= prev_end else end


def _with_rates(row: dict, reported: dict) -> dict:
    """`row` (with step_s, compute_s, exposed_comm_s) completed: the rest of the step, and the
    samples and tokens reported in it (None: none were) with their rate per emulated second."""
    step_s = row["step_s"]
    row["other_s"] = max(0.0, step_s - row["compute_s"] - row["exposed_comm_s"])
    for kind, n in reported.items():
        row[kind] = n
        row[f"{kind}_per_s"] = n / step_s if n is not None and step_s > 0 else None
    return row
