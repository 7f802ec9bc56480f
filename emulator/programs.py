"""Driver side of `cluster.launch(fn)` and `relay launch script.py`: start the program on every
device (emulator/backend/program.py runs it there), gather what each device measured, and write
a results folder with a Perfetto trace."""

from __future__ import annotations

import sys
from dataclasses import replace

import ray

from emulator.backend.engine import algorithms
from emulator.backend.program import Program


class LaunchResult:
    """Per device: the program's return value and its emulated figures."""

    def __init__(self, per_device: list[dict], config: dict):
        self.per_device = per_device
        self.config = config

    @property
    def results(self) -> list:
        """What the function returned on each device (None for a script)."""
        return [d["result"] for d in self.per_device]

    @property
    def emulated_s(self) -> float:
        """The program's emulated time: its slowest device, seconds."""
        return max(d["emulated_s"] for d in self.per_device)

    def __getitem__(self, device: int) -> dict:
        return self.per_device[device]

    def summary(self) -> dict:
        t = self.emulated_s
        mean = lambda k: sum(d[k] for d in self.per_device) / len(self.per_device)  # noqa: E731
        out = {"emulated_s": t, "compute_s": mean("compute_s"), "comm_s": mean("comm_s"),
               "exposed_comm_s": mean("exposed_comm_s"), "real_s": max(d["real_s"] for d in self.per_device),
               "fidelity": min(d["fidelity"] for d in self.per_device)}
        for k in ("tokens", "samples"):
            total = sum(d["counts"].get(k, 0) for d in self.per_device)
            out[f"{k}_per_s"] = total / t if total and t > 0 else None
        return out

    def rows(self) -> list[dict]:
        return [{k: d[k] for k in DEVICE_COLUMNS} | {"tokens": d["counts"].get("tokens"),
                                                    "samples": d["counts"].get("samples")}
                for d in self.per_device]

    def trace(self) -> dict:
        """Chrome-trace timeline (Perfetto): per device, each communication operation on the
        communication lane, in emulated microseconds."""
        events = []
        for d in self.per_device:
            pid = d["device"]
            events += [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"device {pid} (emulated time)"}},
                       {"ph": "M", "name": "thread_name", "pid": pid, "tid": 1, "args": {"name": "communication lane"}},
                       {"ph": "X", "name": "program", "pid": pid, "tid": 0, "ts": 0.0, "dur": d["emulated_s"] * 1e6,
                        "args": {"compute_s": d["compute_s"], "exposed_comm_s": d["exposed_comm_s"]}}]
            for name, a, b, nbytes in d["spans"]:
                events.append({"ph": "X", "name": name, "pid": pid, "tid": 1, "ts": a * 1e6,
                               "dur": max(b - a, 0.0) * 1e6, "args": {"bytes": nbytes}})
        return {"traceEvents": events, "displayTimeUnit": "ns", "otherData": {"time": "emulated"}}


DEVICE_COLUMNS = ["device", "emulated_s", "compute_s", "comm_s", "exposed_comm_s", "real_s", "fidelity"]


def launch(cluster, program: Program) -> LaunchResult:
    """Run `program` on every device of `cluster` (started if it is not)."""
    algorithms(program.algorithm)  # refuses an unknown algorithm before any device starts
    if program.script is None and not callable(program.fn):
        raise ValueError(f"fn = {program.fn!r} is not callable; pass the function every device runs")
    if not cluster.actors:
        cluster.start()
    n = cluster.system.devices
    job = cluster._job(cluster._comm_ratio(4e6))
    nodes = {i["node_ip"] for i in cluster.info}
    host = "127.0.0.1" if len(nodes) == 1 else cluster.info[0]["node_ip"]
    program = replace(program, master=tuple(ray.get(cluster.actors[0].free_address.remote(host))))
    fn = program.fn
    name = getattr(fn, "__module__", None) or ""
    if fn is not None and name in sys.modules and name != "__main__" and not name.startswith(("emulator.", "torch")):
        ray.cloudpickle.register_pickle_by_value(sys.modules[name])  # a test file, a user's module
    per_device = cluster._gather([a.launch.remote(job, program) for a in cluster.actors[:n]], "launch")
    config = {"devices": n, "system": cluster.system.describe(), "clock": cluster.clock,
              "dilation": job.dilation, "algorithms": algorithms(program.algorithm),
              "script": program.script, "argv": list(program.argv)}
    return LaunchResult(per_device, config)


def write_launch(out, config: dict, result: LaunchResult) -> dict:
    """config.json, devices.csv, summary.json and trace.json in a results folder."""
    from emulator.results import UNITS
    out.write_json("config.json", config)
    out.write_csv("devices.csv", result.rows(), DEVICE_COLUMNS + ["tokens", "samples"])
    summary = {"kind": "launch", "name": out.path.name, "units": UNITS | {"emulated_s": "emulated s"},
               "summary": result.summary(), "devices": result.rows()}
    out.write_json("summary.json", summary)
    out.write_json("trace.json", result.trace())
    return summary
