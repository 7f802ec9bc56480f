"""The shared-memory plane between two real device processes (no Ray): exact data both ways,
a peer that dies mid-message or before a collective, a message out of order, and nothing left
in /dev/shm; the `relay` backend's point-to-point messages on either data plane (tags,
messages to itself) and what follows a failed operation."""

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from relay.device.plane.shm import SHM_DIR, slot_bytes_for, unsupported
from relay.device.plane.transport import free_address

HERE = Path(__file__).parent
pytestmark = pytest.mark.skipif(unsupported() is not None, reason=str(unsupported()))


def pair(scenario: str) -> list[dict]:
    _, port = free_address("127.0.0.1")
    procs = [subprocess.Popen([sys.executable, str(HERE / "_shm_peer.py"), scenario, str(r), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parents[1])
             for r in range(2)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
        out.append(json.loads(line[len("RESULT "):]) if line else {"stderr": stderr[-2000:], "rc": p.returncode})
        out[-1]["pid"] = p.pid
    return out


def left(res) -> list[str]:
    """The files of this pair's devices still in /dev/shm (named relay-TOKEN-RANK.PID): only
    theirs, since other Relay runs on this host may come and go meanwhile."""
    pids = {str(r["pid"]) for r in res}
    return [f for f in os.listdir(SHM_DIR) if f.startswith("relay-") and f.rsplit(".", 1)[-1] in pids]


@contextmanager
def another_run():
    """A file of another Relay run on this host, appearing while the pair runs (its pid, this
    process's, is alive: no sweep removes it)."""
    path = Path(SHM_DIR) / f"relay-anotherrun-0.{os.getpid()}"
    path.write_bytes(b"")
    try:
        yield
        assert path.exists(), "the pair's sweep removed another live run's file"
    finally:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def exchanged():
    with another_run():
        return pair("exchange")


@pytest.mark.timeout(150)
def test_messages_both_ways_arrive_exactly_over_shared_memory(exchanged):
    res = exchanged
    for r, other in ((0, "1"), (1, "0")):
        assert res[r]["carriers"] == {other: "shm"}
        assert res[r]["exact"] == [True] * 5, res[r]
        assert res[r]["token_files"] == []  # unlinked once both had mapped them
    assert left(res) == []


def test_posted_messages_move_while_their_device_is_blocked_in_a_collective(exchanged):
    for r in exchanged:
        assert r.get("posted") == [True, True, True], r


@pytest.mark.timeout(100)
def test_a_peer_that_dies_mid_message_is_named_well_before_the_timeout():
    with another_run():
        dead, survivor = pair("die")
    assert "rc" in dead and dead["rc"] == -9  # it really died, mid-message
    # the survivor's timeout is 60 s and this test's 100 s: the error comes from seeing the
    # process gone, not from waiting the timeout out
    assert survivor["error"] == "PeerError" and (survivor["device"], survivor["peer"]) == (1, 0)
    assert "ended mid-message" in survivor["text"]
    assert left([dead, survivor]) == []


@pytest.mark.timeout(100)
def test_a_peer_gone_before_a_collective_is_named_by_the_data_plane_itself():
    """Rank 1's process ends once set up; rank 0 then runs an all-reduce through the `relay`
    backend. No Ray here: only the plane can tell that the peer is gone, and which one."""
    waiter, gone = pair("vanish-auto")
    assert gone["rc"] == 0 and "error" not in gone  # it ended, silently
    assert waiter["error"] == "PeerError" and (waiter["device"], waiter["peer"]) == (0, 1), waiter
    assert "ended" in waiter["text"]  # seen gone (the timeout, 60 s, is not what ended the wait)


@pytest.fixture(scope="module", params=["auto", "gloo"])
def backend(request):
    return request.param, pair(f"backend-{request.param}")


def test_backend_messages_are_matched_by_tag_on_either_plane(backend):
    plane, (_, receiver) = backend
    # sent as tags 1, 2, 5 (10 MB), 6; received as 2, 1, then 6 (blocking) before 5
    assert receiver["tags"] == [[2.0, 2.0], [1.0, 1.0], [2.0, 2.0], True], (plane, receiver)


def test_backend_messages_to_itself_are_copied(backend):
    plane, res = backend
    for r, d in enumerate(res):
        assert d["self"] == [[10.0 + r] * 3, [2 * (10.0 + r)] * 3], (plane, d)


def test_after_a_failed_operation_every_later_one_fails_at_once_naming_it(backend):
    plane, (_, receiver) = backend
    first, *later = receiver["errors"]
    assert first is not None and ("sizes differ" in first if plane == "auto" else "tag 2025" in first), first
    for e in later:  # another receive (whose message is there), then an all-reduce (its peer is not)
        assert e == f"relay: device 1: not run, because an earlier operation on this device failed: " \
                    f"RuntimeError: {first}", (plane, e)


@pytest.mark.timeout(150)
def test_a_message_out_of_order_is_a_protocol_error():
    sender, receiver = pair("mismatch")
    assert receiver["error"] == "RuntimeError"
    assert "expected message 0 of 32 bytes from device 0 (at byte 0), got message 1" in receiver["text"]


def test_slots_shrink_with_many_peers_and_stay_whole_pages():
    assert slot_bytes_for(1) == 1 << 20
    many = slot_bytes_for(63)
    assert many < 1 << 20 and many % 4096 == 0 and 63 * 4 * many <= 64 << 20
