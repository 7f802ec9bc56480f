"""The local executor: every rank of a schedule in one process, giving the data (optional) and
each rank's emulated finishing time. Same timing code as the actors (core.py), so the same
schedule and links give the same virtual times to the last bit.

Ranks are advanced in turn; a rank posts its step's sends at once and finishes the step when
every message it waits for has been posted. Data are torch CPU tensors (numpy has no bf16).
Timing only, a schedule in lockstep (each step of each rank one send and one receive, from a peer
sending to it in the same step: a ring) is timed step by step for all ranks at once with numpy:
the same operations on the same float64 values in the same order per rank, so the same times to
the last bit (tests/unit/test_collectives_local.py checks it), in a tenth of the time.
"""

from __future__ import annotations

from collections import defaultdict, deque

import numpy
import torch

from relay.collectives.core import Ports, apply, gather, time_recv, time_sends
from relay.collectives.schedules import Topology, schedule, seg_len


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
    if buffers is None:
        ends = _lockstep(plans, clock, fabric)
        if ends is not None:
            return ends
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


def _lockstep(plans: list, clock: list[float], fabric) -> list[float] | None:
    """Every rank's finishing time, as the loop above would give it, for a schedule in lockstep;
    None for any other schedule. Per rank and step, as time_sends then time_recv do: the send
    starts at max(clock, egress), leaves at start + o + w; the receive begins at max(sender's
    start + o, ingress), arrives at begin + w + latency; the step ends at max(left, arrived)."""
    world, n = len(plans), len(plans[0]) if plans else 0
    if world < 2 or any(len(p) != n or any(len(st.sends) != 1 or len(st.recvs) != 1 for st in p) for p in plans):
        return None
    to = [[st.sends[0].peer for st in p] for p in plans]
    if any(to[st.recvs[0].peer][k] != r for r, p in enumerate(plans) for k, st in enumerate(p)):
        return None  # (each step a permutation: then the k-th message of a pair is that of the k-th step)
    classes: dict = {}
    links: dict = {}

    def timing(i, j, via, segs):
        key = (i, j, via, seg_len(segs))
        if key not in links:
            cls, link = fabric.link(i, j, via)
            nbytes = key[3] * fabric.elem_bytes
            links[key] = (classes.setdefault(cls, len(classes)), link.o_s, link.wire_s(nbytes), link.latency_s)
        return links[key]

    send = numpy.array([[timing(r, st.sends[0].peer, st.via, st.sends[0].segs) for st in p]
                        for r, p in enumerate(plans)])
    recv = numpy.array([[timing(st.recvs[0].peer, r, st.via, st.recvs[0].segs) for st in p]
                        for r, p in enumerate(plans)])
    peer = numpy.array([[st.recvs[0].peer for st in p] for p in plans])
    ranks = numpy.arange(world)
    egress, ingress = numpy.zeros((len(classes), world)), numpy.zeros((len(classes), world))
    t = numpy.array(clock, dtype=numpy.float64)
    for k in range(n):
        cls, o, w = send[:, k, 0].astype(int), send[:, k, 1], send[:, k, 2]
        start = numpy.maximum(t, egress[cls, ranks])
        left = start + o + w
        egress[cls, ranks] = left
        done = numpy.maximum(t, left)
        cls, o, w, latency = recv[:, k, 0].astype(int), recv[:, k, 1], recv[:, k, 2], recv[:, k, 3]
        begin = numpy.maximum(start[peer[:, k]] + o, ingress[cls, ranks])
        ingress[cls, ranks] = begin + w
        t = numpy.maximum(done, begin + w + latency)
    return t.tolist()
