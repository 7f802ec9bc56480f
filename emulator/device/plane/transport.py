"""The data plane between device actors, and the distributed executor that runs collective
schedules over it.

Each pair of devices has one carrier, chosen automatically: shared memory (shm.py, near.py)
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

import json
import os
import socket
from collections import defaultdict, deque
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist

from relay.collectives.core import Ports, apply, gather, time_recv, time_sends
from relay.collectives.fabric import Fabric, Timing
from relay.collectives.schedules import Step, schedule, seg_len
from relay.device.job import die
from relay.device.plane import near
from relay.device.plane.peers import PeerError
from relay.kernels.clock import VirtualLane

TAG_SPACE = 1 << 24  # gloo tags are 32-bit; sequence numbers wrap inside this space
P2P_TAGS = 1 << 25  # point-to-point messages' tags start here: a space of P2P_SEQS per torch tag,
P2P_SEQS = 1 << 20  # (modulo P2P_TAG_SPACES) in which that tag's sequence numbers wrap
P2P_TAG_SPACES = ((1 << 31) - P2P_TAGS) // P2P_SEQS  # (torch passes gloo a signed 32-bit tag)
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


def rendezvous_store(rank: int, world: int, addr: str, port: int, timeout: timedelta, secret: str) -> dist.Store:
    """The set-up store of a transport: rank 0 serves it on `addr` alone (loopback when every
    device is on one node), the others connect there. TCPStore's server would otherwise listen
    on every interface whatever host it is given; a socket bound here is handed to it instead
    (it owns and closes it). Every key, gloo's too, starts with the run's `secret` (the driver
    makes one per connection), so that nothing can write where a device will read without
    knowing it. The store has no authentication: anyone who reaches the port can still list its
    keys (see README, Security)."""
    listen_fd = listening_fd(addr, port, world) if rank == 0 else None
    store = dist.TCPStore(addr, port, world, rank == 0, timeout, master_listen_fd=listen_fd)
    return dist.PrefixStore(f"relay-{secret}", store)


def listening_fd(addr: str, port: int, backlog: int) -> int:
    """A TCP socket listening on `addr` alone, as a file descriptor for TCPStore's
    master_listen_fd (TCPStore then owns and closes it)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    try:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((addr, port))
        server.listen(max(128, backlog))
    except OSError:
        server.close()
        raise
    return server.detach()


def _decode(raw: bytes, me: int, peer: int):
    """A set-up message: JSON (tuples come back as lists), never pickle, which would run whatever
    code a process that reached the store's port wrote there."""
    try:
        return json.loads(raw)
    except ValueError:  # (UnicodeDecodeError too)
        raise RuntimeError(f"device {me}: the set-up message of device {peer} in the rendezvous store "
                           f"is not JSON ({bytes(raw[:16])!r}...): another process wrote to the store; "
                           "is its port reachable from outside?") from None


class Transport:
    """`node` names the host this device runs on (its Ray node id): devices with the same node
    talk through shared memory unless data_plane is 'gloo'."""

    def __init__(self, rank: int, world: int, addr: str, port: int, timeout_s: float,
                 node: str | None = None, data_plane: str = "auto", secret: str = ""):
        if data_plane not in DATA_PLANES:
            raise ValueError(f"data_plane = {data_plane!r} is unknown; choose 'auto' or 'gloo'")
        self.rank, self.world, self.timeout = rank, world, timedelta(seconds=timeout_s)
        iface = _interface_of(addr)
        if iface and "GLOO_SOCKET_IFNAME" not in os.environ:  # gloo would otherwise pick the
            os.environ["GLOO_SOCKET_IFNAME"] = iface  # hostname's interface, often loopback
        self.store = rendezvous_store(rank, world, addr, port, self.timeout, secret)
        self.pg = dist.ProcessGroupGloo(self.store, rank, world, self.timeout)
        self._meetings = 0
        self.sent = defaultdict(int)  # peer -> messages sent to it
        self.got = defaultdict(int)  # peer -> messages received from it
        self.p2p_sent = defaultdict(int)  # the same for point-to-point messages (Transport.post)
        self.p2p_got = defaultdict(int)
        self._spare: dict = {}  # (slot, dtype) -> reusable receive area
        self.plane, self.near = None, frozenset()  # shared memory, and the peers it reaches
        self.mailbox = None  # posted point-to-point messages over shared memory (mailbox.Mailbox)
        if data_plane == "auto":
            near.open_plane(self, node, timeout_s)

    def meet(self, value=None) -> list:
        """Every device's `value` once all have arrived (through the store, as JSON: see _decode)."""
        self._meetings += 1
        key = f"meet{self._meetings}"
        self.store.set(f"{key}/{self.rank}", json.dumps(value))
        return [_decode(self.store.get(f"{key}/{r}"), self.rank, r) for r in range(self.world)]

    def carriers(self) -> dict[int, str]:
        """Peer -> 'shm' or 'gloo': what carries this device's messages to each."""
        return {p: "shm" if p in self.near else "gloo" for p in range(self.world) if p != self.rank}

    def close(self) -> None:
        if self.mailbox is not None:
            self.mailbox.close()
            self.mailbox = None
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
        self.run(steps, buf, VirtualLane(), Ports(), free_fabric(world, buf.element_size()), ranks=ranks)
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

    def post(self, kind: str, peer: int, tensors: list[torch.Tensor], tag: int = 0) -> tuple[int, list]:
        """Point-to-point messages (the `relay` backend's send and recv): sends or receives of
        `tensors` (a header, then the payload unless empty) to or from device `peer`, posted at
        once and not waited for, apart from collectives' messages (gloo tags of their own;
        shared-memory rings of their own, mailbox.Mailbox). A receive takes the first message of its
        peer and `tag` not yet taken, whatever the order of other tags' (as gloo's point-to-point
        messages). Returns the message's sequence number among its peer's and tag's, and its
        handles (wait(timeout))."""
        count = self.p2p_sent if kind == "send" else self.p2p_got
        seq = count[peer, tag]
        count[peer, tag] += 1
        if peer in self.near:  # shared memory: the same header (sender, tag, bytes, start) and payload, one handle
            hdr, payload = tensors[0], tensors[1] if len(tensors) > 1 else None
            if kind == "send":
                return seq, [self.mailbox.send(peer, tuple(hdr.tolist()), payload)]
            return seq, [self.mailbox.recv(peer, tag, hdr, payload)]
        call = self.pg.send if kind == "send" else self.pg.recv
        return seq, [call([t], peer, p2p_tag(tag, seq, k)) for k, t in enumerate(tensors) if t.numel()]

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
        window, posted = 0, None  # none when every peer is on shared memory (nothing to post)
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
            if not incoming and near.simple(step):  # host time of small messages: see near.py
                start = near.quick_step(self, step, starts, buf, elem_bytes, dev, op)
                if start is not False:
                    end = done if start is None else time_recv(me, step.recvs[0], start, ports, fabric, step.via)
                    lane.advance_to(max(done, end))
                    if window and k + window < len(steps):
                        posted.append(self._post_recvs(steps[k + window], (k + window) % window, dtype, dev, data))
                    continue
            sends, keep, near_sends = [], [], []
            for s, start in zip(step.sends, starts):
                peer = dev(s.peer)
                seq = self.sent[peer]
                self.sent[peer] += 1
                n = seg_len(s.segs)
                if peer in self.near:
                    near_sends.append(near.send(peer, s, (self.rank, seq, n * elem_bytes, start), buf))
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
                near_recvs = near.recvs(self, step, buf, dtype, elem_bytes, staged, dev, op)
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
            if window and k + window < len(steps):  # the slot this step's receives used is free now
                posted.append(self._post_recvs(steps[k + window], (k + window) % window, dtype, dev, data))
            lane.advance_to(end)


def p2p_tag(tag: int, seq: int, part: int) -> int:
    """The gloo tag of part `part` (header 0, payload 1) of point-to-point message `seq` of torch
    tag `tag`. Gloo matches by peer and gloo tag, in posting order; each torch tag has a space
    of its own, and two that share one (equal modulo P2P_TAG_SPACES) are told apart by the
    header's tag, which the engine checks."""
    return P2P_TAGS + tag % P2P_TAG_SPACES * P2P_SEQS + (2 * seq + part) % P2P_SEQS


def free_fabric(world: int, elem_bytes: int) -> Fabric:
    """Instant links, for control messages that are not part of any emulated time."""
    return Fabric(Timing(0.0, float("inf")), None, world, world, elem_bytes=elem_bytes)


SCRATCH_BYTES = 256 << 20  # receive areas posted ahead, at most (at least one step's)


def _wait(work, timeout, me: int, peer: int) -> None:
    try:
        work.wait(timeout)
    except RuntimeError as e:  # timed out, or the peer's connection closed under us
        raise PeerError(me, peer, f"waited up to {timeout.total_seconds():g} s; gloo: "
                        f"{str(e).splitlines()[0][:160]}") from None
