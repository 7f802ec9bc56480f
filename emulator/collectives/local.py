"""The local executor: every rank of a schedule in one process, giving the data (optional) and
each rank's emulated finishing time. Same timing code as the actors (core.py), so the same
schedule and links give the same virtual times to the last bit.

Ranks are advanced in turn; a rank posts its step's sends at once and finishes the step when
every message it waits for has been posted. Data are torch CPU tensors (numpy has no bf16).
"""

from __future__ import annotations

from collections import defaultdict, deque

import torch

from emulator.collectives.core import Ports, apply, gather, time_recv, time_sends
from emulator.collectives.schedules import Topology, schedule


def execute(primitive: str, algorithm: str, world: int, count: int, topology: Topology, fabric,
            buffers: list[torch.Tensor] | None = None, start_times=None, op: str = "sum",
            **options) -> list[float]:
    """Run the schedule on all ranks, timed by `fabric` (a Fabric, its protocol already chosen);
    `buffers` (one flat tensor per rank, changed in place) may be None to time only; reducing
    receives combine with `op` (sum, max, min, product). Returns each rank's finishing time,
    emulated seconds."""
    plans = [schedule(primitive, algorithm, r, world, count, topology, **options) for r in range(world)]
    clock = list(start_times) if start_times is not None else [0.0] * world
    base = fabric.base_s()
    clock = [t + base if plan else t for t, plan in zip(clock, plans)]
    ports = [Ports() for _ in range(world)]
    at = [0] * world  # next step of each rank
    posted = [None] * world  # (send_done) once the current step's sends are out
    mail = defaultdict(deque)  # (src, dst) -> deque of (start, payload)
    remaining = sum(1 for plan in plans if plan)
    while remaining:
        progress = False
        for r in range(world):
            while at[r] < len(plans[r]):
                step = plans[r][at[r]]
                if posted[r] is None:
                    starts, done = time_sends(r, step, clock[r], ports[r], fabric)
                    for s, t in zip(step.sends, starts):
                        payload = gather(buffers[r], s.segs).clone() if buffers is not None else None
                        mail[r, s.peer].append((t, payload))
                    posted[r] = done
                need = defaultdict(int)
                for rv in step.recvs:
                    need[rv.peer] += 1
                if any(len(mail[p, r]) < k for p, k in need.items()):
                    break  # wait for the senders to get this far
                end = posted[r]
                for rv in step.recvs:
                    t, payload = mail[rv.peer, r].popleft()
                    end = max(end, time_recv(r, rv, t, ports[r], fabric, step.via))
                    if buffers is not None:
                        apply(buffers[r], rv, payload, op)
                clock[r], posted[r] = end, None
                at[r] += 1
                progress = True
                if at[r] == len(plans[r]):
                    remaining -= 1
        if remaining and not progress:
            stuck = [r for r in range(world) if at[r] < len(plans[r])]
            raise RuntimeError(f"schedule {primitive}/{algorithm} deadlocks at world {world}, "
                               f"count {count}: ranks {stuck} wait forever")
    leftover = [k for k, q in mail.items() if q]
    if leftover:
        raise RuntimeError(f"schedule {primitive}/{algorithm}: messages never received on {leftover}")
    return clock
