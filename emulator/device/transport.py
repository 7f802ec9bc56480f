"""The data plane between device actors, and the distributed executor that runs collective
schedules over it.

Each pair of devices has one carrier, chosen automatically: shared memory (emulator/shm.py)
between devices on the same Ray node, point-to-point torch.distributed (gloo) between devices on
different nodes (or between all, with data_plane='gloo'). The gloo group is the transport's own
(on its own TCPStore), not torch's default group, which stays free for the program a device
runs (`cluster.launch`: a `relay` group over this transport). Over gloo, every message is two sends
posted together (no extra round trip): a 4-number header (sender, sequence, bytes, emulated start
time) and the payload, received into a reused area; over shared memory the same header travels
with each piece. The receiver checks the header against its own schedule (a mismatch is a
protocol error, never silently absorbed) and computes the arrival time with the same link model
as the local executor (collectives/core.py).
"""

from __future__ import annotations

import functools
import os
import pickle
import socket
import time
import uuid
from collections import defaultdict, deque
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist

from emulator.collectives.core import Ports, apply, gather, time_recv, time_sends
from emulator.collectives.fabric import Fabric, Timing
from emulator.collectives.schedules import Recv, Send, Step, schedule, seg_len
from emulator.device.job import die
from emulator.device.peers import PeerError
from emulator.device.shm import RecvOp, SendOp, ShmPlane, unsupported
from kernels.clock import VirtualLane

TAG_SPACE = 1 << 24  # gloo tags are 32-bit; sequence numbers wrap inside this space
P2P_TAGS = 1 << 25  # point-to-point messages' tags start here
DATA_PLANES = ("auto", "gloo")  # auto: shared memory within a node, gloo across nodes


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
    """`node` names the host this device runs on (its Ray node id): devices with the same node
    talk through shared memory unless data_plane is 'gloo'."""

    def __init__(self, rank: int, world: int, addr: str, port: int, timeout_s: float,
                 node: str | None = None, data_plane: str = "auto"):
        if data_plane not in DATA_PLANES:
            raise ValueError(f"data_plane = {data_plane!r} is unknown; choose 'auto' or 'gloo'")
        self.rank, self.world, self.timeout = rank, world, timedelta(seconds=timeout_s)
        iface = _interface_of(addr)
        if iface and "GLOO_SOCKET_IFNAME" not in os.environ:  # gloo would otherwise pick the
            os.environ["GLOO_SOCKET_IFNAME"] = iface  # hostname's interface, often loopback
        self.store = dist.TCPStore(addr, port, world, rank == 0, self.timeout)
        self.pg = dist.ProcessGroupGloo(self.store, rank, world, self.timeout)
        self._meetings = 0
        self.sent = defaultdict(int)  # peer -> messages sent to it
        self.got = defaultdict(int)  # peer -> messages received from it
        self.p2p_sent = defaultdict(int)  # the same for point-to-point messages (Transport.post)
        self.p2p_got = defaultdict(int)
        self._spare: dict = {}  # (slot, dtype) -> reusable receive area
        self.plane, self.near = None, frozenset()  # shared memory, and the peers it reaches
        if data_plane == "auto":
            _open_shared_memory(self, node, timeout_s)

    def meet(self, value=None) -> list:
        """Every device's `value` once all have arrived (through the store: set-up, not data)."""
        self._meetings += 1
        key = f"meet{self._meetings}"
        self.store.set(f"{key}/{self.rank}", pickle.dumps(value))
        return [pickle.loads(self.store.get(f"{key}/{r}")) for r in range(self.world)]

    def carriers(self) -> dict[int, str]:
        """Peer -> 'shm' or 'gloo': what carries this device's messages to each."""
        return {p: "shm" if p in self.near else "gloo" for p in range(self.world) if p != self.rank}

    def close(self) -> None:
        if self.plane is not None:
            self.plane.close()
            self.plane = None
        self.pg = self.store = None

    def control(self, primitive: str, buf: torch.Tensor, world: int, ranks: list[int] | None = None) -> torch.Tensor:
        """A collective among devices 0..world-1 (or among `ranks`), in place on `buf`, outside
        any emulated time: control traffic, not training traffic."""
        me, world = (self.rank, world) if ranks is None else (ranks.index(self.rank), len(ranks))
        steps = schedule(primitive, "halving_doubling" if primitive == "all_reduce" else "ring",
                         me, world, buf.numel(), chunks=1)
        self.run(steps, buf, VirtualLane(), Ports(), _free_fabric(world, buf.element_size()), ranks=ranks)
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

    def post(self, kind: str, peer: int, tensors: list[torch.Tensor]) -> tuple[int, list]:
        """Point-to-point messages (the `relay` backend's send and recv): gloo sends or receives
        of `tensors` (a header, then the payload unless empty) to or from device `peer`, posted at
        once and not waited for, on sequence numbers and tags of their own (they never mix with a
        collective's messages). Returns the message's sequence number and the gloo works."""
        count = self.p2p_sent if kind == "send" else self.p2p_got
        seq = count[peer]
        count[peer] += 1
        call = self.pg.send if kind == "send" else self.pg.recv
        return seq, [call([t], peer, P2P_TAGS + self._tag(seq, k)) for k, t in enumerate(tensors) if t.numel()]

    def _tag(self, seq: int, part: int) -> int:
        return (2 * seq + part) % TAG_SPACE

    def _scratch(self, slot: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A reused receive area (fresh allocations page-fault on every step)."""
        buf = self._spare.get((slot, dtype))
        if buf is None or buf.numel() < n:
            buf = self._spare[slot, dtype] = torch.empty(max(n, 1), dtype=dtype)
        return buf

    def _post_recvs(self, step: Step, slot: int, dtype: torch.dtype, dev, data: bool = True) -> list:
        """Gloo receives of `step`, posted (the shared-memory ones need no posting); without
        `data`, headers alone."""
        need = sum(seg_len(r.segs) for r in step.recvs if dev(r.peer) not in self.near) if data else 0
        scratch, at, posted = self._scratch(slot, need, dtype) if need else None, 0, []
        for i, r in enumerate(step.recvs):
            peer = dev(r.peer)
            if peer in self.near:
                continue
            seq = self.got[peer]
            self.got[peer] += 1
            hdr = torch.empty(4, dtype=torch.float64)
            works = [self.pg.recv([hdr], peer, self._tag(seq, 0))]
            n = seg_len(r.segs)
            area = scratch[at:at + n] if n and data else None
            if area is not None:
                works.append(self.pg.recv([area], peer, self._tag(seq, 1)))
            at += n
            posted.append((i, r, seq, n, hdr, area, works))
        return posted

    def run(self, steps: list[Step], buf: torch.Tensor, lane, ports, fabric, fail_at: int | None = None,
            ranks: list[int] | None = None, op: str = "sum") -> None:
        """Execute this rank's schedule on `buf` (flat, CPU), pacing every message on `lane` with
        the link model of `fabric` (a Fabric resolved for this collective: collectives.resolve).
        `ranks`: the schedule is a process group's, whose rank i is device ranks[i] (the schedule
        and the fabric speak group ranks; messages go to devices). `op`: how reducing receives
        combine (sum, max, min, product).

        Gloo receives are posted `window` steps ahead, so that a sender that runs ahead never
        finds its peer unready: gloo then writes arriving bytes straight into place (measured on
        4 actors, 4 MB ring steps: 4.2 ms with the receive posted first, 7.0 ms without).

        A meta `buf` (a fake tensor's stand-in, tensors="fake") moves no data: each message is its
        header alone, which carries the real message's size, so the timing is the real run's."""
        dtype, data = buf.dtype, not buf.is_meta
        buf = buf if data else None
        elem_bytes, dev = fabric.elem_bytes, (lambda r: r) if ranks is None else ranks.__getitem__
        me = self.rank if ranks is None else ranks.index(self.rank)
        if steps:  # the collective's fixed cost, before its first step (as the local executor)
            lane.advance_to(lane.now() + fabric.base_s())
        window = 0  # none when every peer is on shared memory (nothing to post: host time per step)
        if len(self.near) < self.world - 1:
            most = max((sum(seg_len(r.segs) for r in st.recvs if dev(r.peer) not in self.near) for st in steps),
                       default=0)
            window = min(len(steps), max(1, SCRATCH_BYTES // max(1, most * dtype.itemsize)))
        posted = deque(self._post_recvs(steps[k], k % window, dtype, dev, data) for k in range(window))
        for k, step in enumerate(steps):
            if k == fail_at:  # an injected failure, mid-collective
                die()
            t0 = lane.now()
            incoming = posted.popleft() if window else ()
            starts, done = time_sends(me, step, t0, ports, fabric)
            sends, keep, near_sends = [], [], []
            for s, start in zip(step.sends, starts):
                peer = dev(s.peer)
                seq = self.sent[peer]
                self.sent[peer] += 1
                n = seg_len(s.segs)
                if peer in self.near:
                    near_sends.append(_shm_send(peer, s, (self.rank, seq, n * elem_bytes, start), buf))
                    continue
                hdr = torch.tensor([self.rank, seq, n * elem_bytes, start], dtype=torch.float64)
                sends.append((self.pg.send([hdr], peer, self._tag(seq, 0)), peer))
                if n and data:
                    payload = gather(buf, s.segs)
                    sends.append((self.pg.send([payload], peer, self._tag(seq, 1)), peer))
                    keep.append(payload)
                keep.append(hdr)
            arrived, staged = {}, {}  # recv index -> sender's emulated start; -> staging area
            if near_sends or any(dev(r.peer) in self.near for r in step.recvs):
                near_recvs = _shm_recvs(self, step, buf, dtype, elem_bytes, staged, dev, op)
                self.plane.exchange(near_sends, list(near_recvs.values()))
                arrived = {i: rop.start for i, rop in near_recvs.items()}
            for i, r, seq, n, hdr, area, works in incoming:
                peer = dev(r.peer)
                for w in works:
                    _wait(w, self.timeout, self.rank, peer)
                sender, hseq, nbytes, start = hdr.tolist()
                if (int(sender), int(hseq), int(nbytes)) != (peer, seq, n * elem_bytes):
                    raise RuntimeError(f"device {self.rank}: protocol error, expected message {seq} of "
                                       f"{n * elem_bytes} bytes from device {peer}, got message "
                                       f"{int(hseq)} of {int(nbytes)} bytes from device {int(sender)}")
                arrived[i] = start
                if area is not None:
                    staged[i] = area
            end = done
            for i, r in enumerate(step.recvs):  # in list order: the ingress ports serve in this order
                end = max(end, time_recv(me, r, arrived[i], ports, fabric, step.via))
            for w, peer in sends:  # the buffer may change only once the sends have read it
                _wait(w, self.timeout, self.rank, peer)
            for i, r in enumerate(step.recvs):
                if i in staged:
                    apply(buf, r, staged[i], op)
            if window and k + window < len(steps):
                posted.append(self._post_recvs(steps[k + window], (k + window) % window, dtype, dev, data))
            lane.advance_to(end)


def _shm_recvs(t: Transport, step: Step, buf, dtype, elem_bytes: int, staged: dict, dev, op: str) -> dict:
    """The shared-memory receives of `step`: straight into `buf` where that is safe (and the
    reduction a sum), else into a staging area (recorded in `staged`) applied with the gloo
    ones, in list order; with no `buf`, headers alone."""
    direct = [d and (op in ("sum", "avg") or not r.reduce) for d, r in zip(_direct(step), step.recvs)]
    ops, stage_at = {}, 0
    need = sum(seg_len(r.segs) for i, r in enumerate(step.recvs) if dev(r.peer) in t.near and not direct[i])
    area = t._scratch(-1, need, dtype) if need and buf is not None else None
    for i, r in enumerate(step.recvs):
        peer = dev(r.peer)
        if peer not in t.near:
            continue
        seq = t.got[peer]
        t.got[peer] += 1
        n = seg_len(r.segs)
        if buf is None:
            ops[i] = RecvOp(t.rank, peer, seq, n * elem_bytes, [], r.reduce)
        elif direct[i]:
            views, at = [], 0
            for a, b in r.segs:
                if b > a:
                    views.append((at, buf[a:b]))
                    at += (b - a) * buf.element_size()
            ops[i] = RecvOp(t.rank, peer, seq, n * elem_bytes, views, r.reduce)
        else:
            staged[i] = area[stage_at:stage_at + n]
            ops[i] = RecvOp(t.rank, peer, seq, n * elem_bytes, [(0, staged[i])] if n else [], False)
            stage_at += n
    return ops


def _open_shared_memory(t: Transport, node: str | None, timeout_s: float) -> None:
    """The shared-memory plane to the devices on this node (every device calls this at once)."""
    ok = node is not None and unsupported() is None
    me = (node, os.getpid(), ok, uuid.uuid4().hex[:12])
    everyone = t.meet(me)
    peers = {r: pid for r, (n, pid, their_ok, _) in enumerate(everyone)
             if r != t.rank and ok and their_ok and n == node}
    # the token (rank 0's) names this group's files apart from any other run on the host
    t.plane = ShmPlane(t.rank, peers, everyone[0][3], timeout_s, t.meet)
    t.near = frozenset(peers)


def _shm_send(peer: int, s, header: tuple, buf: torch.Tensor | None) -> SendOp:
    """A shared-memory send of the segments of `s`, by address: no tensor made per segment (a
    strided buffer is copied first: sends read it as it is now). No buffer: the header alone."""
    if buf is None:
        return SendOp(peer, header, [])
    buf = buf if buf.is_contiguous() else buf.contiguous()
    e, base, at, spans = buf.element_size(), buf.data_ptr(), 0, []
    for a, b in s.segs:
        if b > a:
            spans.append((at, base + a * e, (b - a) * e))
            at += (b - a) * e
    op = SendOp(peer, header, spans)
    op.keep = buf  # a copy, if one was made, lives as long as the message
    return op


@functools.lru_cache(maxsize=4096)  # the same steps recur every collective: host time per step
def _direct(step: Step) -> tuple[bool, ...]:
    """Which receives of `step` may land in the buffer piece by piece, as they arrive: those whose
    segments meet no send's (sends read the buffer as it was at the start of the step) and no
    other receive's (overlapping receives apply in list order, so sums keep one order)."""
    out = []
    for i, r in enumerate(step.recvs):
        others = [g for s in step.sends for g in s.segs]
        others += [g for j, q in enumerate(step.recvs) if j != i for g in q.segs]
        out.append(not any(a < d and c < b for a, b in r.segs for c, d in others))
    return tuple(out)


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


def pingpong(t: Transport, peer: int, nbytes: int, repeats: int) -> dict:
    """Real seconds per one-way message of `nbytes` between this device and `peer` (which runs the
    same call), measured by ping-pong through this transport and through gloo's own send/recv."""
    x = torch.ones(max(1, nbytes // 4))
    segs = ((0, x.numel()),)
    send, recv = [Step(sends=(Send(peer, segs),))], [Step(recvs=(Recv(peer, segs, reduce=False),))]
    free = _free_fabric(t.world, 4)
    ours = [lambda: t.run(send, x, VirtualLane(), Ports(), free),
            lambda: t.run(recv, x, VirtualLane(), Ports(), free)]
    gloo = [lambda: t.pg.send([x], peer, 0).wait(), lambda: t.pg.recv([x], peer, 0).wait()]
    out = {}
    for name, (a, b) in (("relay_s", ours), ("gloo_s", gloo)):
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
