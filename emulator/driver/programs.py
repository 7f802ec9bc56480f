"""The driver side of `cluster.launch(fn)` and `relay launch script.py`: start the program on
every device (device/backend/program.py runs it there) and gather what each device measured."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import replace

import ray

from relay.device import jobs
from relay.device.backend.collective import algorithms
from relay.device.backend.program import Program, run_program
from relay.device.backend.steps import aggregate
from relay.device.fake.program import launch_fake
from relay.driver.launch_shared import launch_shared
from relay.driver.pacing import comm_ratio
from relay.errors import ConfigError

DEVICE_COLUMNS = ["device", "emulated_s", "compute_s", "comm_s", "exposed_comm_s", "real_s", "fidelity"]


class LaunchResult:
    """Per device: the program's return value and its emulated figures (seconds)."""

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

    def steps(self) -> list[dict]:
        """One row per optimizer step of the program, over every device (device/backend/steps.py);
        empty for a program that steps no optimizer."""
        return aggregate([d.get("steps", []) for d in self.per_device])

    def step_rows(self) -> list[dict]:
        """Every device's own row per optimizer step, device by device."""
        return [r for d in self.per_device for r in d.get("steps", [])]

    def rows(self) -> list[dict]:
        return [{k: d[k] for k in DEVICE_COLUMNS} | {"tokens": d["counts"].get("tokens"),
                                                    "samples": d["counts"].get("samples")}
                for d in self.per_device]


@contextlib.contextmanager
def rendezvous(cluster):
    """torch.distributed's rendezvous store (MASTER_ADDR, _PORT) for one run of a program: served by
    device 0 (jobs.serve_store) on loopback when every device is on one node, else on its node's
    address, and closed when the run ends."""
    nodes = {i["node_ip"] for i in cluster.info}
    host = "127.0.0.1" if len(nodes) == 1 else cluster.info[0]["node_ip"]
    address = tuple(cluster.run(jobs.serve_store, host, cluster.system.devices, cluster.timeout_s, devices=1,
                                what="launch set-up")[0])
    try:
        yield address
    finally:
        with contextlib.suppress(Exception):  # best effort: device 0 may be what failed, and a failed
            # run's caller still collects the surviving devices' steps (abort would kill them first)
            cluster.run(jobs.close_store, devices=1, what="launch clean-up", abort=False)


def launch(cluster, program: Program, on_poll=None, tensors: str = "real", shared: bool = False,
           plan=None) -> LaunchResult:
    """Run `program` on every device of `cluster` (started if it is not); on_poll() runs about
    once a second while it does (`relay launch` shows the devices' output). `tensors="fake"`: the
    program runs on fake tensors (device/fake/program.py), on the virtual clock. `shared`: one
    worker per role runs it and every device is replayed (driver/launch_shared.py; `plan`: a
    Parallel, or its text, whose groups the program's are)."""
    if shared:
        return launch_shared(cluster, program, on_poll, plan, tensors)
    if plan is not None:
        raise ConfigError(f"parallel = {plan!r} is a hint for shared runs only; add shared=True (--shared)")
    algorithms(program.algorithm)  # an unknown algorithm is refused before any device starts
    if tensors not in ("real", "fake"):
        raise ConfigError(f"tensors = {tensors!r} is invalid; choose 'real' or 'fake'")
    if tensors == "fake":
        if cluster.clock != "virtual":
            raise ConfigError("tensors = 'fake' needs the virtual clock (fake tensors take no real time); "
                              "drop --clock wall")
        program = replace(program, wrap=launch_fake)
    if program.script is None and not callable(program.fn):
        raise ConfigError(f"fn = {program.fn!r} is not callable; pass the function every device runs")
    if not cluster.actors:
        cluster.start()
    n = cluster.system.devices
    job = cluster.job(comm_ratio(cluster.system, 4e6))
    program = replace(program, node=ray.get_runtime_context().get_node_id())
    fn = program.fn
    name = getattr(fn, "__module__", None) or ""
    if fn is not None and name in sys.modules and name != "__main__" and not name.startswith(("relay.", "torch")):
        ray.cloudpickle.register_pickle_by_value(sys.modules[name])  # a test file, a user's module
    with rendezvous(cluster) as address:
        per_device = cluster.run(run_program, job, replace(program, master=address), what="launch", on_poll=on_poll)
    config = {"devices": n, "system": cluster.system.describe(), "clock": cluster.clock,
              "dilation": job.dilation, "algorithms": algorithms(program.algorithm),
              "script": program.script, "module": program.module, "argv": list(program.argv),
              "tensors": tensors, "host_clock": program.host_clock}
    return LaunchResult(per_device, config)
