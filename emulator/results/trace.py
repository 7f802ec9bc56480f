"""The Perfetto (Chrome-trace) timeline of a training run, in emulated time."""

from __future__ import annotations


def chrome_trace(result, system) -> dict:
    """A Chrome-trace timeline (opens in Perfetto or chrome://tracing): one process per device,
    a compute lane and a communication lane, times in emulated microseconds."""
    events = []
    for d, rows in enumerate(result.per_device):
        events.append({"ph": "M", "name": "process_name", "pid": d,
                       "args": {"name": f"device {d} ({system.chip.name}, emulated time)"}})
        events.append({"ph": "M", "name": "thread_name", "pid": d, "tid": 0, "args": {"name": "compute lane"}})
        events.append({"ph": "M", "name": "thread_name", "pid": d, "tid": 1,
                       "args": {"name": "communication lane"}})
        for r in rows:
            for name, spans in r["spans"].items():
                tid = 1 if name == "all-reduce" else 0
                for a, b in (spans if tid else [spans]):
                    events.append({"ph": "X", "name": f"{name} (step {r['step']})", "pid": d, "tid": tid,
                                   "ts": a * 1e6, "dur": max(b - a, 0.0) * 1e6, "args": {"step": r["step"]}})
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"clock": result.config["clock"], "time": "emulated"}}
