"""`relay cluster up | status | down`: a Ray cluster for Relay that outlives one command.

`up` starts a Ray head (loopback by default, no dashboard unless asked) in a temp dir of its
own and records its address in $RELAY_HOME/cluster.json (default ~/.relay). Commands then join it
with `--address recorded` (or the printed host:port, or `auto`). `down` stops the processes that
`up` started, found by that temp dir, and nothing else: unlike `ray stop`, it leaves other Ray
clusters on the machine alone.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import ray
from ray._private import ray_constants
from tabulate import tabulate

from relay.driver.session import CPU_PER_DEVICE, MEMORY_MB, devices_that_fit, join_ray, record_path
from relay.errors import ConfigError


def _ray_binary() -> str:
    ray = Path(sys.executable).with_name("ray")
    return str(ray) if ray.exists() else "ray"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return host == "localhost"


def _ours(temp_dir: str) -> list[psutil.Process]:
    """Processes whose command line names our temp dir: the ones `up` started."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["cmdline"] and any(temp_dir in part for part in p.info["cmdline"]) and p.pid != os.getpid():
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def read_record() -> dict | None:
    path = record_path()
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise ConfigError(f"{path} is not a Relay cluster record; remove it and run `relay cluster up` again") from None


def write_secret(path: Path, text: str) -> None:
    """Write `text` to a new file that only its owner can read, made so from the start (a file
    written, then chmod-ed, is readable in between). A file or link already at `path` (a stale
    token) is removed, not followed: a link planted there cannot redirect the secret."""
    path.unlink(missing_ok=True)  # a symlink itself, never its target
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def cmd_up(args) -> None:
    rec = read_record()
    if rec and _ours(rec["temp_dir"]):
        raise ConfigError(f"a Relay cluster is already up at {rec['address']}; `relay cluster down` first")
    host = args.host or "127.0.0.1"
    port = args.port or _free_port(host)
    cpus = args.cpus or psutil.cpu_count() or 1
    store_mb = args.object_store_mb or int(min(2048, psutil.virtual_memory().available / 2**20 * 0.1))
    if cpus < 1 or store_mb < 100:
        raise ConfigError(f"--cpus {cpus} / --object-store-mb {store_mb}: need at least 1 CPU and 100 MB")
    temp_dir = f"/tmp/relay-ray-{port}"  # short: Ray's socket paths must stay under 107 characters
    cmd = [_ray_binary(), "start", "--head", f"--node-ip-address={host}", f"--port={port}",
           f"--num-cpus={cpus}", f"--object-store-memory={store_mb * 2**20}",
           f"--include-dashboard={'true' if args.dashboard else 'false'}", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    # Ray authenticates every client with a shared token; Relay makes one per cluster, keeps it
    # beside the record (mode 600), and presents it whenever it joins the recorded cluster
    record_path().parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = record_path().with_name(f"auth_token_{port}")
    write_secret(token, secrets.token_hex(32))
    env = dict(os.environ, RAY_worker_maximum_startup_concurrency="256", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token))
    loopback = _is_loopback(host)
    if loopback:  # else `ray start` turns 127.0.0.1 into the LAN address and listens everywhere
        env[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"  # (session.on_loopback)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    if out.returncode != 0:
        token.unlink(missing_ok=True)
        raise RuntimeError(f"`ray start` failed (exit {out.returncode}): {out.stderr.strip()[-800:]}")
    address = f"{host}:{port}"
    record_path().write_text(json.dumps({"address": address, "temp_dir": temp_dir, "token": str(token), "cpus": cpus,
                                         "object_store_mb": store_mb, "loopback": loopback,
                                         "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    print(f"Relay cluster up at {address} ({cpus} CPUs, object store {store_mb} MB, "
          f"dashboard {'on' if args.dashboard else 'off'}); recorded in {record_path()}")
    print("Use it:")
    print(f"  relay run --address recorded ...        (or --address {address})")
    print(f"  Cluster(system, address='{address}')   (Python)")
    if loopback:
        print("  add a machine:  not to this one (loopback only): `relay cluster up --host <LAN address>`")
    else:
        print(f"  add a machine:  ray start --address={address}   (run on that machine; see the README)")
    print("  see it:        relay cluster status")
    print("  stop it:       relay cluster down")


def cmd_status(args) -> None:
    address = join_ray(args.address or "recorded", logging_level="ERROR", log_to_driver=False)  # with the token
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        free = devices_that_fit(MEMORY_MB * 2**20)
    finally:
        ray.shutdown()
    rows, fit_total = [], 0
    for n in nodes:
        res = n["Resources"]
        mem = res.get("memory", 0)
        fit = min(int(mem // (MEMORY_MB * 2**20)), int(res.get("CPU", 0) / CPU_PER_DEVICE + 1e-9))
        fit_total += fit
        rows.append([n["NodeManagerAddress"], n["NodeID"][:12], f"{res.get('CPU', 0):g}", f"{res.get('GPU', 0):g}",
                     f"{mem / 2**30:.1f}", fit])
    print(f"# Ray cluster at {address}: {len(nodes)} node(s)")
    print(tabulate(rows, headers=["node", "id", "CPUs", "GPUs", "memory (GiB)", "devices that fit"],
                   disable_numparse=True))
    print(f"# devices that fit in all: {fit_total} ({MEMORY_MB} MB each); room now: {free}")


def cmd_down(args) -> None:
    rec = read_record()
    if rec is None:
        raise ConfigError(f"no Relay cluster is recorded in {record_path()}; nothing to stop")
    procs = _ours(rec["temp_dir"])
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    record_path().unlink(missing_ok=True)
    if rec.get("token"):
        Path(rec["token"]).unlink(missing_ok=True)
    print(f"Relay cluster at {rec['address']} stopped ({len(procs)} process(es)); other Ray clusters untouched")


def add_parser(sub) -> None:
    c = sub.add_parser("cluster", help="start, inspect or stop a Ray cluster for Relay")
    verbs = c.add_subparsers(dest="verb", required=True)
    up = verbs.add_parser("up", help="start a local Ray head for Relay and record its address")
    up.add_argument("--host", help="address to listen on (default 127.0.0.1; a LAN address to add machines)")
    up.add_argument("--port", type=int, help="GCS port (default: a free one)")
    up.add_argument("--cpus", type=int, help="CPUs to offer (default: all)")
    up.add_argument("--object-store-mb", type=int,
                    help="object store size (default: 10%% of free memory, at most 2 GB)")
    up.add_argument("--dashboard", action="store_true", help="start Ray's dashboard too")
    up.set_defaults(fn=cmd_up)
    st = verbs.add_parser("status", help="nodes, CPUs, memory and how many devices fit")
    st.add_argument("--address", help="cluster to inspect (default: the recorded one)")
    st.set_defaults(fn=cmd_status)
    dn = verbs.add_parser("down", help="stop what `relay cluster up` started, and nothing else")
    dn.set_defaults(fn=cmd_down)
