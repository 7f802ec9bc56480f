"""The Perfetto (Chrome-trace) timelines of a training run and of a launched program, in
emulated time."""

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
                tid = 1 if isinstance(spans, list) else 0  # lists: communication operations
                for a, b in (spans if tid else [spans]):
                    events.append({"ph": "X", "name": f"{name} (step {r['step']})", "pid": d, "tid": tid,
                                   "ts": a * 1e6, "dur": max(b - a, 0.0) * 1e6, "args": {"step": r["step"]}})
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"clock": result.config["clock"], "time": "emulated"}}


def launch_trace(result) -> dict:
    """A launched program's timeline (driver/programs.py LaunchResult): per device, the program
    on the compute lane, where each optimizer step ends, and each communication operation on the
    communication lane."""
    events = []
    for d in result.per_device:
        pid = d["device"]
        events += [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"device {pid} (emulated time)"}},
                   {"ph": "M", "name": "thread_name", "pid": pid, "tid": 0, "args": {"name": "compute lane"}},
                   {"ph": "M", "name": "thread_name", "pid": pid, "tid": 1, "args": {"name": "communication lane"}},
                   {"ph": "X", "name": "program", "pid": pid, "tid": 0, "ts": 0.0, "dur": d["emulated_s"] * 1e6,
                    "args": {"compute_s": d["compute_s"], "exposed_comm_s": d["exposed_comm_s"]}}]
        events += [{"ph": "i", "s": "t", "name": f"step {r['step']} ends", "pid": pid, "tid": 0,
                    "ts": r["end_s"] * 1e6} for r in d.get("steps", [])]  # at each optimizer.step()
        for name, a, b, nbytes in d["spans"]:
            events.append({"ph": "X", "name": name, "pid": pid, "tid": 1, "ts": a * 1e6,
                           "dur": max(b - a, 0.0) * 1e6, "args": {"bytes": nbytes}})
    return {"traceEvents": events, "displayTimeUnit": "ns", "otherData": {"clock": result.config["clock"],
                                                                        "time": "emulated"}}
