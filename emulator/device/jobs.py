"""Functions the driver runs on device workers (`worker.run(fn, *args)`): set-up of the
transport, throttled matmuls, and collectives over the transport."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from datetime import timedelta

import ray
import torch
import torch.distributed as dist

from relay.collectives.alltoall import layout_for
from relay.collectives.core import Ports, finish, prepare
from relay.collectives.schedules import Recv, Send, Step
from relay.device.backend.collective import choose, group_of, run_collective
from relay.device.job import Job
from relay.device.plane.transport import Transport, free_address, free_fabric, listening_fd
from relay.kernels.clock import VirtualLane


def identify(dev) -> dict:
    """Where this device runs (answered once it has started)."""
    return {"pid": os.getpid(), "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}


def address(dev, host: str) -> tuple[str, int]:
    """An address this device (rank 0) can listen on."""
    return free_address(host)


def serve_store(dev, host: str, world: int, timeout_s: float) -> tuple[str, int]:
    """Serve a launched program's default-group rendezvous store (MASTER_ADDR, MASTER_PORT) on
    `host` alone until close_store, as torchrun's agent does: every rank of the program connects
    to it as a client (TORCHELASTIC_USE_AGENT_STORE, backend/program.py). The program's own rank 0
    would otherwise serve it on every interface, whatever MASTER_ADDR says, and only while it runs."""
    close_store(dev)
    host, port = free_address(host)
    dev.agent_store = dist.TCPStore(host, port, world, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                                    master_listen_fd=listening_fd(host, port, world))
    return host, port


def close_store(dev) -> None:
    """Stop serving the store serve_store started (its server closes with the object)."""
    dev.agent_store = None


def connect(dev, addr: str, port: int, world: int, timeout_s: float, data_plane: str = "auto",
            secret: str = "") -> bool:
    """(Re)build the transport to every other device (shared memory to those on this node with
    data_plane 'auto', gloo to the rest). `secret`: the run's, in every rendezvous key."""
    if dev.transport is not None:
        dev.transport.close()
    dev.transport = None
    dev.transport = Transport(dev.index, world, addr, port, timeout_s,
                              node=ray.get_runtime_context().get_node_id(), data_plane=data_plane, secret=secret)
    return True


def carriers(dev) -> dict[int, str]:
    """Peer -> what carries this device's messages to it ('shm' or 'gloo')."""
    return dev.transport.carriers()


def pingpong(dev, peer: int, nbytes: int, repeats: int) -> dict:
    """Real seconds per one-way message of `nbytes` between this device and `peer` (which runs the
    same call), measured by ping-pong through this transport (a one-step schedule: relay_s; a
    posted message, as the backend's send and recv: posted_s) and through gloo's send/recv."""
    t = dev.transport
    x = torch.ones(max(1, nbytes // 4))
    segs = ((0, x.numel()),)
    send, recv = [Step(sends=(Send(peer, segs),))], [Step(recvs=(Recv(peer, segs, reduce=False),))]
    free = free_fabric(t.world, 4)
    ours = [lambda: t.run(send, x, VirtualLane(), Ports(), free),
            lambda: t.run(recv, x, VirtualLane(), Ports(), free)]
    hdr, got = torch.tensor([t.rank, 0, nbytes, 0.0], dtype=torch.float64), torch.empty(4, dtype=torch.float64)
    posted = [lambda: [w.wait(t.timeout) for w in t.post("send", peer, [hdr, x])[1]],
              lambda: [w.wait(t.timeout) for w in t.post("recv", peer, [got, x])[1]]]
    gloo = [lambda: t.pg.send([x], peer, 0).wait(), lambda: t.pg.recv([x], peer, 0).wait()]
    out = {}
    for name, (a, b) in (("relay_s", ours), ("posted_s", posted), ("gloo_s", gloo)):
        if t.rank > peer:
            a, b = b, a  # the second device answers
        for timed in (False, True):  # a warm-up round first
            t.barrier(max(t.rank, peer) + 1)
            t0 = time.perf_counter()
            for _ in range(repeats if timed else max(1, repeats // 10)):
                a()
                b()
        out[name] = (time.perf_counter() - t0) / repeats / 2
    return out


def run_matmuls(dev, job: Job, sizes: list[int], repeats: list[int]) -> dict:
    """Square matmuls of the given sizes under the throttle; per-size and total figures."""
    gen = torch.Generator().manual_seed(dev.index)
    mats = {n: (torch.randn(n, n, generator=gen).to(dev.host),
                torch.randn(n, n, generator=gen).to(dev.host)) for n in set(sizes)}
    lane = job.lane()
    throttle = job.throttle(dev.index, lane, dev.host)
    per_size = []
    lane.start()
    t_start, r_start = lane.measure(), time.time()
    with throttle:
        for n, reps in zip(sizes, repeats):
            with throttle.pause():
                t0, r0, c0, f0 = lane.measure(), time.time(), throttle.emulated_s, throttle.flops
            a, b = mats[n]
            for _ in range(reps):
                torch.mm(a, b)
            with throttle.pause():
                t1 = lane.measure()
            per_size.append({"size": n, "repeats": reps, "emulated_s": t1 - t0,
                             "modeled_s": throttle.emulated_s - c0, "flops": throttle.flops - f0,
                             "real_s": time.time() - r0})
    total = lane.measure() - t_start
    stats = lane.stats()
    return {"device": dev.index, "emulated_s": total, "modeled_s": throttle.emulated_s,
            "real_s": time.time() - r_start, "flops": throttle.flops, "fidelity": stats["fidelity"],
            "overrun_s": stats["overrun_s"], "overruns": stats["overruns"], "sizes": per_size}


def collective(dev, job: Job, primitive: str, algorithm: str, cases: list, op: str = "sum",
               root: int = 0, repeats: int = 1) -> list[dict]:
    """Collectives among devices 0..job.system.devices-1 (this one included), one per case.
    A case is (tensor, chunks), or ((numel, dtype), chunks) for a tensor made here (benchmarks
    need not ship it)."""
    world, rank, transport = job.system.devices, dev.index, dev.transport
    results, stats = [], {"overrun_s": 0.0}
    group = group_of(job.system, job.fabric(), range(world), rank)
    fail = job.faults.fail
    for tensor, chunks in cases:
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.ones(tensor[0], dtype=getattr(torch, tensor[1]))
        count, elem = tensor.numel() * (world if primitive == "all_gather" else 1), tensor.element_size()
        alg, _ = choose(primitive, algorithm, count * elem, group, group.fabric.with_(elem_bytes=elem))
        layout = layout_for(rank, world, count, group.topology, alg) if primitive == "all_to_all" else None
        times, real = [], 0.0
        for _ in range(repeats):
            buf = prepare(primitive, rank, world, tensor.cpu(), layout)
            # every collective starts from emulated 0 on all devices at once: in wall mode at a
            # common real time agreed on now, so that no device's start-up skew enters it
            if job.clock == "wall":
                lane = replace(job, epoch=transport.agree(time.time() + 0.02 + 0.002 * world, world)).lane()
                lane.start()
            else:
                lane = job.lane()
                transport.barrier(world)  # start together: real_s measures the collective, not
                #                           the devices' skew in making and preparing its input
            r0 = time.time()
            run_collective(transport, group, primitive, alg, buf, count, lane, 0.0, root=root, chunks=chunks,
                           fail_at=fail[1] if fail and fail[0] == rank else None)
            times.append(lane.measure())
            real += time.time() - r0
            stats["overrun_s"] += lane.stats()["overrun_s"]
        results.append({"output": finish(primitive, rank, world, buf, op, tensor.shape, layout).to(tensor.device),
                        "emulated_s": times, "real_s": real / repeats})
    for r in results:
        r.update(device=rank, **stats)
    return results


def gloo_all_reduce(dev, nbytes: int, repeats: int) -> float:
    """Real seconds per torch.distributed.all_reduce (gloo's own algorithm), for comparison."""
    x = torch.ones(nbytes // 4)
    dev.transport.barrier(dev.transport.world)
    t = time.time()
    for _ in range(repeats):
        dev.transport.pg.allreduce([x]).wait()
    return (time.time() - t) / repeats
