"""The device worker: one Ray actor per emulated device, holding no job (as Ray Train's worker
does). It owns what belongs to the device rather than to a run (one torch thread, the host
device, the transport to its peers) and runs whatever function the driver sends it:
`run(fn, *args)` returns `fn(device, *args)`. Matmul jobs, collectives and training are such
functions (device/jobs.py, device/training/loop.py). A second thread answers `ping` and `progress`
while the first one works, so the driver can tell a busy device from a stuck one.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import ray
import torch

from relay.device.plane.transport import Transport


@dataclass
class Device:
    """What a function run on a worker gets: the device's state outside any one run."""
    index: int  # global device index (rank in the transport)
    host: str = "cpu"  # where tensors really live: "cpu" or "cuda"
    transport: Transport | None = None  # set by jobs.connect
    rows: list = field(default_factory=list)  # progress of the running job, read by `progress`

    def report(self, row: dict) -> None:
        self.rows.append(row)


class DeviceWorker:
    def __init__(self, index: int, host: str = "cpu"):
        torch.set_num_threads(1)
        self.device = Device(index, host)

    def run(self, fn, *args, **kwargs):
        try:
            return fn(self.device, *args, **kwargs)
        except Exception as e:
            try:
                pickle.dumps(e)
                plain = e.__cause__ is not None  # the chain would not travel: say it in the message
            except Exception:  # (torch's, holding C++ objects): Ray could not send it back, and would
                plain = True  # report an internal error instead of the device's
            if plain:
                raise RuntimeError(_chain(e)) from None
            raise

    def ping(self) -> bool:
        return True

    def progress(self) -> list[dict]:
        """Rows the running job has reported so far (answered while it runs)."""
        return list(self.device.rows)


RemoteWorker = ray.remote(DeviceWorker)


def _chain(e: BaseException) -> str:
    """An exception and its causes, each as its first line: 'A: ... (caused by B: ...)'."""
    parts = []
    while e is not None and len(parts) < 4:
        lines = [x.strip() for x in str(e).split("\n") if x.strip()]
        parts.append(f"{type(e).__name__}: {' '.join(lines[:2])[:300]}")
        e = e.__cause__
    return " (caused by ".join(parts) + ")" * (len(parts) - 1)
