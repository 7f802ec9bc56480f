"""One of two device processes talking through the shared-memory plane (run by test_shm.py):
    python _shm_peer.py SCENARIO RANK PORT
Prints RESULT <json>. Scenarios: exchange (messages both ways, large and small, checked against
the data each side computes for itself; then the backend's point-to-point messages), die
(rank 0 dies after the first piece of a message), mismatch (rank 0 skips a sequence number);
and through the `relay` torch.distributed backend on either data plane (SCENARIO-auto or
SCENARIO-gloo): backend (tags, messages to itself, an operation after a failed one), vanish
(rank 1's process ends before an all-reduce that rank 0 then waits in: no Ray to tell it)."""

import json
import os
import signal
import sys
import time
from datetime import timedelta

import torch

from relay.collectives.core import Ports
from relay.collectives.schedules import Recv, Send, Step
from relay.device.plane.peers import PeerError
from relay.device.plane.shm import SHM_DIR, SendOp
from relay.device.plane.transport import P2P_TAG_SPACES, Transport, free_fabric
from relay.kernels.clock import VirtualLane

scenario, rank, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
scenario, _, plane = scenario.partition("-")
torch.set_num_threads(1)
t = Transport(rank, 2, "127.0.0.1", port, timeout_s=60 if scenario in ("die", "vanish") else 20, node="one-host",
              data_plane=plane or "auto")
other = 1 - rank
out = {"carriers": t.carriers(), "token_files": [f for f in os.listdir(SHM_DIR) if f.startswith("relay-")
                                                 and f.endswith(f".{os.getpid()}")]}


def run(steps, buf):
    t.run(steps, buf, VirtualLane(), Ports(), free_fabric(t.world, buf.element_size()))


def data(r, n, dtype):
    g = torch.Generator().manual_seed(r)
    return torch.randint(-50, 50, (n,), generator=g).to(dtype)


def backend():
    """The `relay` torch.distributed backend on this transport, as program.py sets it up."""
    import torch.distributed as dist

    from relay import System
    from relay.collectives import Fabric
    from relay.device.backend import group as relay_group
    from relay.device.backend.engine import Engine
    system = System("h100", 2)
    engine = Engine(rank, t, system, Fabric.of(system), VirtualLane(), VirtualLane(), t.timeout.total_seconds())
    relay_group.register()
    relay_group.activate(engine)
    dist.init_process_group("relay", rank=rank, world_size=2, store=dist.PrefixStore("program", t.store))
    return dist


def tags_and_failure(dist):
    """Messages matched by tag (received in another order than sent; a large one arrives before
    any receive of its tag is posted), messages to itself, then a failed receive: the
    operations after it fail at once, naming it."""
    a, b, big = torch.full((2,), 1.0), torch.full((2,), 2.0), data(7, 2_600_001, torch.float32)  # 10 MB
    try:
        if rank == 0:
            for w in [dist.isend(a, 1, tag=1), dist.isend(b, 1, tag=2), dist.isend(big, 1, tag=5),
                      dist.isend(b, 1, tag=6)]:
                w.wait()
        else:
            x, y, z, later = torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2_600_001)
            for w in [dist.irecv(x, 0, tag=2), dist.irecv(y, 0, tag=1)]:
                w.wait()
            dist.recv(z, 0, tag=6)  # the 10 MB message of tag 5 is ahead of it
            dist.recv(later, 0, tag=5)
            out["tags"] = [x.tolist(), y.tolist(), z.tolist(), torch.equal(later, big)]
    except Exception as e:  # noqa: BLE001 (each part's error is its result)
        out["tags"] = f"raised {e}"
    mine, got, got2 = torch.full((3,), 10.0 + rank), torch.zeros(3), torch.zeros(3)
    try:
        works = [dist.irecv(got2, rank, tag=4),  # posted before its send (torch's send and recv refuse
                 dist.isend(mine, rank, tag=3), dist.isend(mine * 2, rank, tag=4)]  # their own rank)
        dist.irecv(got, rank, tag=3).wait()
        for w in works:
            w.wait()
        out["self"] = [got.tolist(), got2.tolist()]
    except Exception as e:  # noqa: BLE001
        out["self"] = f"raised {e}"
    if rank == 0:  # a message the receive refuses (3 elements for 2 over shared memory; over gloo, which
        #            aborts the process on a size mismatch, one of a tag that shares tag 9's gloo tags)
        dist.isend(torch.ones(3), 1, tag=9) if plane != "gloo" else dist.isend(torch.ones(2), 1, tag=9 + P2P_TAG_SPACES)
        dist.isend(torch.ones(2), 1, tag=9)  # then one that would fit
        t.store.get("failure seen")  # alive until rank 1 is done (a peer gone is another failure)
        return
    errors = []
    for op in (lambda: dist.recv(torch.zeros(2), 0, tag=9), lambda: dist.recv(torch.zeros(2), 0, tag=9),
               lambda: dist.all_reduce(torch.ones(1))):
        try:
            op()
            errors.append(None)
        except Exception as e:  # noqa: BLE001 (the errors are the result)
            errors.append(str(e))
    out["errors"] = errors
    t.store.set("failure seen", "1")


try:
    if scenario == "exchange":
        ok = []
        # multi-piece (slots are 1 MB), segments that straddle pieces, a zero-length message,
        # reduce and copy, sends and receives in the same step; 10 MB: more pieces than the ring
        # holds, so the sender waits for room and is rung back
        for dtype, n in ((torch.float32, 700_001), (torch.bfloat16, 1_500_003), (torch.int64, 3),
                         (torch.float32, 2_600_001)):
            mine, theirs = data(rank, n, dtype), data(other, n, dtype)
            cut = [0, n // 7, n // 7 + 1, n // 2, n]
            segs = tuple((cut[i], cut[i + 1]) for i in range(4))
            half = ((0, n // 2),), ((n // 2, n),)
            buf = mine.clone()
            step = Step(sends=(Send(other, half[rank]), Send(other, ())),
                        recvs=(Recv(other, half[other], reduce=True), Recv(other, (), reduce=False)))
            run([step, Step(sends=(Send(other, segs),), recvs=(Recv(other, segs, reduce=False),))], buf)
            # step 0: each adds the other's half into its own; step 1: each copies the other's
            # whole buffer as it was after step 0 (the receive overlaps the send: staged)
            theirs_after = theirs.clone()
            theirs_after[slice(*half[rank][0])] += mine[slice(*half[rank][0])]
            ok.append(torch.equal(buf, theirs_after))
        # one-element messages take the quick path (ShmPlane.quick); rank 0 sends 10 in a row
        # before rank 1 takes any, so the 5th finds the 4-slot ring full and waits for room on
        # the general path; rank 1 adds the even ones and copies the odd ones
        buf, zero = data(rank, 10, torch.float32), data(0, 10, torch.float32)
        before = buf.clone()
        if rank == 0:
            run([Step(sends=(Send(1, ((k, k + 1),)),)) for k in range(10)], buf)
        else:
            time.sleep(0.5)
            run([Step(recvs=(Recv(0, ((k, k + 1),), reduce=k % 2 == 0),)) for k in range(10)], buf)
        even = torch.arange(10) % 2 == 0
        ok.append(torch.equal(buf, before if rank == 0 else torch.where(even, before + zero, zero)))
        out["exact"] = ok
        # the backend's send/recv (Transport.post): rank 0 posts a 10 MB send (more than the
        # ring holds) and a receive, then blocks in a collective step with rank 1; rank 1 joins
        # that step only once the whole message has arrived, so the send must keep moving while
        # rank 0's thread is blocked (the mailbox's own thread), as a gloo send would
        n, timeout = 2_600_001, timedelta(seconds=20)
        payload = data(rank, n, torch.float32)
        hdr_in, area = torch.empty(4, dtype=torch.float64), torch.empty(n)
        hdr_out = torch.tensor([rank, 0, n * 4, 1.5 + rank], dtype=torch.float64)
        _, sent = t.post("send", other, [hdr_out, payload])
        _, got = t.post("recv", other, [hdr_in, area])
        step = [Step(sends=(Send(other, ((0, 1),)),), recvs=(Recv(other, ((1, 2),), reduce=False),))]
        if rank == 1:
            got[0].wait(timeout)
        run(step, torch.zeros(2))
        for w in (*sent, *got):
            w.wait(timeout)
        out["posted"] = [torch.equal(area, data(other, n, torch.float32)),
                         hdr_in.tolist() == [other, 0, n * 4, 1.5 + other], t.mailbox is not None]
    elif scenario == "die":
        n = 4 << 20  # 16 MB of float32: many pieces
        buf = torch.ones(n)
        if rank == 0:
            op = SendOp(1, (0, 0, n * 4, 0.0), [(0, buf.data_ptr(), n * 4)])
            op.push(t.plane.tx[1], t.plane.files[1].addr)  # the first piece only, then a crash
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.time()
        run([Step(recvs=(Recv(0, ((0, n),), reduce=False),))], buf)
    elif scenario == "mismatch":
        buf = torch.ones(8)
        if rank == 0:
            t.sent[1] += 1  # a message the receiver does not expect
            run([Step(sends=(Send(1, ((0, 8),)),))], buf)
        else:
            run([Step(recvs=(Recv(0, ((0, 8),), reduce=True),))], buf)
    elif scenario == "backend":
        tags_and_failure(backend())
    elif scenario == "vanish":
        dist = backend()
        t.meet()  # both devices are set up
        if rank == 1:
            os._exit(0)  # gone before the all-reduce, without a word (no Ray here to report it)
        t0 = time.time()
        dist.all_reduce(torch.ones(3 << 20))
except PeerError as e:
    out.update(error="PeerError", device=e.device, peer=e.peer, text=str(e), waited_s=time.time() - t0)
except RuntimeError as e:
    out.update(error="RuntimeError", text=str(e))
print("RESULT " + json.dumps(out), flush=True)
if scenario in ("backend", "vanish"):
    os._exit(0)  # (messages left unsent on purpose would hold the exit up to the timeout)
t.close()
