"""The data plane: point-to-point torch.distributed (gloo) between device actors, and the
distributed executor that runs collective schedules over it.

Every message is two gloo sends posted together (no extra round trip): a 4-number header
(sender, sequence, bytes, emulated start time) and the payload, received into a reused area.
The receiver checks the header against its own schedule (a mismatch is a protocol error, never
silently absorbed) and computes the arrival time with the same link model as the local executor
(collectives/core.py).
"""

from __future__ import annotations

import os
import socket
from collections import defaultdict, deque
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist

from emulator.collectives.core import Ports, apply, gather, time_recv, time_sends
from emulator.collectives.fabric import Fabric, Timing
from emulator.collectives.schedules import Step, schedule, seg_len
from emulator.device.job import die
from kernels.clock import VirtualLane

TAG_SPACE = 1 << 24  # gloo tags are 32-bit; sequence numbers wrap inside this space


class PeerError(RuntimeError):
    """Device `device` gave up on a message to or from device `peer`."""

    def __init__(self, device: int, peer: int, detail: str):
        self.device, self.peer = device, peer
        super().__init__(f"device {device} gave up on device {peer} ({detail})")

    def __reduce__(self):  # travels back to the driver intact
        return PeerError, (self.device, self.peer, str(self).split("(", 1)[-1].rstrip(")"))


def _interface_of(ip: str) -> str | None:
    """The network interface holding `ip` (loopback for 127.x)."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs):
            return name
    return "lo" if ip.startswith("127.") else None


def free_address(host: str) -> tuple[str, int]:
    """An address rank 0 can listen on: the host and a port the kernel says is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return host, s.getsockname()[1]


class Transport:
    def __init__(self, rank: int, world: int, addr: str, port: int, timeout_s: float):
        self.rank, self.world, self.timeout = rank, world, timedelta(seconds=timeout_s)
        iface = _interface_of(addr)
        if iface and "GLOO_SOCKET_IFNAME" not in os.environ:  # gloo would otherwise pick the
            os.environ["GLOO_SOCKET_IFNAME"] = iface  # hostname's interface, often loopback
        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank,
                                world_size=world, timeout=self.timeout)
        self.sent = defaultdict(int)  # peer -> messages sent to it
        self.got = defaultdict(int)  # peer -> messages received from it
        self._spare: dict = {}  # (slot, dtype) -> reusable receive area

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def control(self, primitive: str, buf: torch.Tensor, world: int) -> torch.Tensor:
        """A collective among devices 0..world-1 (the process group may hold more), in place on
        `buf`, outside any emulated time: control traffic, not training traffic."""
        steps = schedule(primitive, "halving_doubling" if primitive == "all_reduce" else "ring",
                         self.rank, world, buf.numel(), chunks=1)
        self.run(steps, buf, VirtualLane(), Ports(), _free_fabric(world, buf.element_size()))
        return buf

    def barrier(self, world: int) -> None:
        """Wait until devices 0..world-1 all get here."""
        self.control("all_reduce", torch.zeros(1), world)

    def agree(self, value: float, world: int) -> float:
        """Rank 0's value, on devices 0..world-1 (e.g. a common epoch for the wall clock)."""
        return float(self.control("broadcast", torch.tensor([value], dtype=torch.float64), world)[0])

    def total(self, values: list[float], world: int) -> list[float]:
        """Elementwise sums over devices 0..world-1 (e.g. a step's loss, for the log)."""
        return self.control("all_reduce", torch.tensor(values, dtype=torch.float64), world).tolist()

    def _tag(self, seq: int, part: int) -> int:
        return (2 * seq + part) % TAG_SPACE

    def _scratch(self, slot: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A reused receive area (fresh allocations page-fault on every step)."""
        buf = self._spare.get((slot, dtype))
        if buf is None or buf.numel() < n:
            buf = self._spare[slot, dtype] = torch.empty(max(n, 1), dtype=dtype)
        return buf

    def _post_recvs(self, step: Step, slot: int, dtype: torch.dtype) -> list:
        need = sum(seg_len(r.segs) for r in step.recvs)
        scratch, at, posted = self._scratch(slot, need, dtype), 0, []
        for r in step.recvs:
            seq = self.got[r.peer]
            self.got[r.peer] += 1
            hdr = torch.empty(4, dtype=torch.float64)
            works = [dist.irecv(hdr, r.peer, tag=self._tag(seq, 0))]
            n = seg_len(r.segs)
            area = scratch[at:at + n] if n else None
            if n:
                works.append(dist.irecv(area, r.peer, tag=self._tag(seq, 1)))
            at += n
            posted.append((r, seq, n, hdr, area, works))
        return posted

    def run(self, steps: list[Step], buf: torch.Tensor, lane, ports, fabric, fail_at: int | None = None) -> None:
        """Execute this rank's schedule on `buf` (flat, CPU), pacing every message on `lane` with
        the link model of `fabric` (a Fabric resolved for this collective: collectives.resolve).

        Receives are posted `window` steps ahead, so that a sender that runs ahead never finds
        its peer unready: gloo then writes arriving bytes straight into place (measured on 4
        actors, 4 MB ring steps: 4.2 ms with the receive posted first, 7.0 ms without)."""
        me, elem_bytes = self.rank, fabric.elem_bytes
        if steps:  # the collective's fixed cost, before its first step (as the local executor)
            lane.advance_to(lane.now() + fabric.base_s())
        most = max((sum(seg_len(r.segs) for r in st.recvs) for st in steps), default=0)
        window = min(len(steps), max(1, SCRATCH_BYTES // max(1, most * buf.element_size())))
        posted = deque(self._post_recvs(steps[k], k % window, buf.dtype) for k in range(window))
        for k, step in enumerate(steps):
            if k == fail_at:  # an injected failure, mid-collective
                die()
            t0 = lane.now()
            incoming = posted.popleft()
            starts, done = time_sends(me, step, t0, ports, fabric)
            sends, keep = [], []
            for s, start in zip(step.sends, starts):
                seq = self.sent[s.peer]
                self.sent[s.peer] += 1
                n = seg_len(s.segs)
                hdr = torch.tensor([me, seq, n * elem_bytes, start], dtype=torch.float64)
                sends.append((dist.isend(hdr, s.peer, tag=self._tag(seq, 0)), s.peer))
                if n:
                    payload = gather(buf, s.segs)
                    sends.append((dist.isend(payload, s.peer, tag=self._tag(seq, 1)), s.peer))
                    keep.append(payload)
                keep.append(hdr)
            end = done
            for r, seq, n, hdr, area, works in incoming:
                for w in works:
                    _wait(w, self.timeout, me, r.peer)
                sender, hseq, nbytes, start = hdr.tolist()
                if (int(sender), int(hseq), int(nbytes)) != (r.peer, seq, n * elem_bytes):
                    raise RuntimeError(f"device {me}: protocol error, expected message {seq} of "
                                       f"{n * elem_bytes} bytes from device {r.peer}, got message "
                                       f"{int(hseq)} of {int(nbytes)} bytes from device {int(sender)}")
                end = max(end, time_recv(me, r, start, ports, fabric, step.via))
            for w, peer in sends:  # the buffer may change only once the sends have read it
                _wait(w, self.timeout, me, peer)
            for r, seq, n, hdr, area, works in incoming:
                if area is not None:
                    apply(buf, r, area)
            if k + window < len(steps):
                posted.append(self._post_recvs(steps[k + window], (k + window) % window, buf.dtype))
            lane.advance_to(end)


def _free_fabric(world: int, elem_bytes: int) -> Fabric:
    """Instant links, for control messages that are not part of any emulated time."""
    return Fabric(Timing(0.0, float("inf")), None, world, world, elem_bytes=elem_bytes)


SCRATCH_BYTES = 256 << 20  # receive areas posted ahead, at most (at least one step's)


def _wait(work, timeout, me: int, peer: int) -> None:
    try:
        work.wait(timeout)
    except RuntimeError as e:  # timed out, or the peer's connection closed under us
        raise PeerError(me, peer, f"waited up to {timeout.total_seconds():g} s; gloo: "
                        f"{str(e).splitlines()[0][:160]}") from None
