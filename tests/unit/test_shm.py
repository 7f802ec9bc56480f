"""The shared-memory plane between two real device processes (no Ray): exact data both ways,
a peer that dies mid-message, a message out of order, and nothing left in /dev/shm."""

import json
import os
import subprocess
import sys
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
    return out


@pytest.fixture(scope="module")
def exchanged():
    before = set(os.listdir(SHM_DIR))
    return before, pair("exchange")


@pytest.mark.timeout(150)
def test_messages_both_ways_arrive_exactly_over_shared_memory(exchanged):
    before, res = exchanged
    for r, other in ((0, "1"), (1, "0")):
        assert res[r]["carriers"] == {other: "shm"}
        assert res[r]["exact"] == [True] * 5, res[r]
        assert res[r]["token_files"] == []  # unlinked once both had mapped them
    assert {f for f in os.listdir(SHM_DIR) if f.startswith("relay-")} <= before


def test_posted_messages_move_while_their_device_is_blocked_in_a_collective(exchanged):
    for r in exchanged[1]:
        assert r.get("posted") == [True, True, True], r


@pytest.mark.timeout(100)
def test_a_peer_that_dies_mid_message_is_named_well_before_the_timeout():
    before = set(os.listdir(SHM_DIR))
    dead, survivor = pair("die")
    assert "rc" in dead and dead["rc"] == -9  # it really died, mid-message
    # the survivor's timeout is 60 s and this test's 100 s: the error comes from seeing the
    # process gone, not from waiting the timeout out
    assert survivor["error"] == "PeerError" and (survivor["device"], survivor["peer"]) == (1, 0)
    assert "ended mid-message" in survivor["text"]
    assert {f for f in os.listdir(SHM_DIR) if f.startswith("relay-")} <= before


@pytest.mark.timeout(150)
def test_a_message_out_of_order_is_a_protocol_error():
    sender, receiver = pair("mismatch")
    assert receiver["error"] == "RuntimeError"
    assert "expected message 0 of 32 bytes from device 0 (at byte 0), got message 1" in receiver["text"]


def test_slots_shrink_with_many_peers_and_stay_whole_pages():
    assert slot_bytes_for(1) == 1 << 20
    many = slot_bytes_for(63)
    assert many < 1 << 20 and many % 4096 == 0 and 63 * 4 * many <= 64 << 20
