"""The transport's rendezvous (a TCPStore between real device transports, in threads) and the
token of `relay cluster up`: what an outsider could reach, and what it could make a device do."""

import argparse
import os
import pickle
import stat
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import psutil
import pytest
import torch.distributed as dist

from relay.device.plane.transport import Transport, free_address
from relay.launch import ray_cluster


@pytest.fixture
def pair(monkeypatch):
    """Two real transports (ranks 0 and 1, gloo) on loopback; `pair(**options)` builds them."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # the transport would set it for the whole process
    made = []

    def build(**options):
        addr, port = free_address("127.0.0.1")
        with ThreadPoolExecutor(2) as pool:  # each blocks until the other has joined
            ts = list(pool.map(lambda r: Transport(r, 2, addr, port, 30, data_plane="gloo", **options), (0, 1)))
        made.extend(ts)
        return ts, port

    yield build
    for t in made:
        t.close()


class Payload:
    """Unpickling this creates a file: code run by whoever wrote the bytes."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_the_rendezvous_store_listens_on_the_devices_address_only(pair):
    (t0, t1), port = pair()
    servers = [c.laddr.ip for c in psutil.Process().net_connections("inet")
               if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert servers == ["127.0.0.1"]  # not 0.0.0.0 or :: (every interface)


def test_a_pickle_written_into_the_rendezvous_store_is_refused_never_run(pair, tmp_path):
    (t0, t1), _ = pair()
    ran = tmp_path / "ran"
    # where device 1's first set-up message goes, written first by someone else
    t0.store.set("meet1/1", pickle.dumps(Payload(ran)))
    err = None
    try:
        t0.meet("hello")
    except RuntimeError as e:
        err = str(e)
    assert not ran.exists()
    assert err and "device 0" in err and "device 1" in err and "not JSON" in err


def test_set_up_messages_round_trip_and_every_store_key_carries_the_runs_secret(pair):
    secret = "5ecret-of-this-run"
    (t0, t1), port = pair(secret=secret)
    with ThreadPoolExecutor(2) as pool:  # each waits for the other's message
        got = list(pool.map(lambda t: t.meet(("node", t.rank, True)), (t0, t1)))
    assert got == [[["node", 0, True], ["node", 1, True]]] * 2  # (tuples come back as lists)
    outsider = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
    keys = outsider.list_keys()
    assert keys and all(secret in k for k in keys), keys  # the set-up's and gloo's own
    assert not outsider.check(["meet1/0"])


def test_the_cluster_token_is_created_private_and_a_planted_link_is_not_followed(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    decoy = tmp_path / "decoy"
    decoy.write_text("someone else's file")
    decoy.chmod(0o644)
    monkeypatch.setenv("RELAY_HOME", str(home))
    monkeypatch.setattr(ray_cluster, "_ray_binary", lambda: "false")  # `ray start` fails once the token is written
    args = argparse.Namespace(host=None, port=free_address("127.0.0.1")[1], cpus=1, object_store_mb=100,
                              dashboard=False)
    (home / f"auth_token_{args.port}").symlink_to(decoy)
    with pytest.raises(RuntimeError, match="ray start"):
        ray_cluster.cmd_up(args)
    assert decoy.read_text() == "someone else's file" and stat.S_IMODE(decoy.stat().st_mode) == 0o644
    old = os.umask(0)  # the mode is the file's own from the start, not the umask's leftover
    try:
        path = home / "token"
        ray_cluster.write_secret(path, "abc")
    finally:
        os.umask(old)
    assert path.read_text() == "abc" and stat.S_IMODE(path.lstat().st_mode) == 0o600
