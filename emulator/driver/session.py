"""The Ray session and the placement of device workers on it.

With no address and no Ray running in the process, Relay starts an embedded local Ray (no
dashboard) and shuts it down when done; with an address, or when Ray is already initialised, it
uses that cluster and leaves it running. Each scale-up domain is one placement group packed onto
as few nodes as it fits, each device one bundle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path

import psutil
import ray
from ray._private import (
    ray_constants,  # the switch that keeps a node on loopback (on_loopback)
    state,  # per-node resources: Ray has no public call for them
)
from ray._raylet import AuthenticationTokenLoader, Config  # the auth token cache (see _use_token)
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from relay.device.worker import RemoteWorker
from relay.errors import ConfigError

MEMORY_MB = 300  # Ray memory reserved per device worker (a torch process is ~175 MB unique)
CPU_PER_DEVICE = 0.01  # Ray CPU per device: devices time-share cores; the dilation keeps them honest


def record_path() -> Path:
    """Where `relay cluster up` records the cluster it started ($RELAY_HOME, default ~/.relay)."""
    return Path(os.environ.get("RELAY_HOME", Path.home() / ".relay")) / "cluster.json"


def _use_token(path: str) -> None:
    """Present the recorded cluster's shared secret. Ray reads RAY_AUTH_MODE and the token path
    from the environment, but caches its config when it is imported, so refresh it the way Ray's
    own ray.init does for a new local cluster (authentication_token_setup._enable_token_auth)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = path
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def resolve_address(address: str) -> str:
    """'recorded' (the cluster `relay cluster up` started), 'auto' (Ray finds one), or host:port."""
    if address == "recorded":
        path = record_path()
        if not path.exists():
            raise ConfigError(f"address = 'recorded' but no cluster is recorded in {path}; run "
                             "`relay cluster up` first, or give host:port or 'auto'")
        rec = json.loads(path.read_text())
        if rec.get("token"):
            _use_token(rec["token"])
        return rec["address"]
    if address != "auto" and not re.fullmatch(r"(ray://)?[\w.\-]+:\d+", address):
        raise ConfigError(f"address = {address!r} is not an address; give host:port, 'auto' or 'recorded'")
    return address


def connect_ray(address: str | None) -> bool:
    """Make sure Ray is initialised; True when this call started it (the caller then stops it)."""
    if ray.is_initialized():
        return False
    namespace = f"relay-{uuid.uuid4().hex[:8]}"  # two relay commands on one cluster never meet
    if address is None:
        # errors still reach the driver as exceptions; worker start-up chatter does not. Ray warns
        # once more workers start than it has CPUs; Relay's devices time-share cores on purpose,
        # so raise the threshold (Ray's own knob; it cannot be muted).
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", "256")
        start_local_ray(num_cpus=psutil.cpu_count() or 1, object_store_memory=512 * 2**20,
                        logging_level=logging.ERROR, log_to_driver=False, namespace=namespace)
    else:
        join_ray(address, logging_level=logging.ERROR, namespace=namespace)
    return True


@contextlib.contextmanager
def on_loopback():
    """Ray nodes started or joined inside this block live on 127.0.0.1, so every server binds
    loopback only.

    Ray binds its servers (GCS, raylet, object manager, core workers) to the node's address, and
    only a node on 127.0.0.1 binds loopback alone; but on Linux ray.init and `ray start` pick the
    machine's network address, and turn a given 127.0.0.1 into it too (then listen on every
    interface). Ray's own switch for machines without multi-node clusters
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) keeps a node on loopback. Ray reads it when imported,
    so both the read value and the variable (for the processes ray.init starts) are set here,
    and restored after: a later connection to a real cluster must find the network address."""
    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


def start_local_ray(**options) -> None:
    """Start the embedded single-node Ray, no dashboard, every server on loopback (on_loopback).
    Clients also need Ray's token: a new local cluster turns token auth on unless RAY_AUTH_MODE
    says otherwise (the token: ~/.ray/auth_token, or RAY_AUTH_TOKEN_PATH)."""
    with on_loopback():
        ray.init(address="local", include_dashboard=False, **options)


def join_ray(address: str, **options) -> str:
    """Connect to the Ray cluster at `address` (see resolve_address); returns the address. The
    cluster `relay cluster up` recorded on loopback is joined on loopback, as it was started."""
    address = resolve_address(address)
    try:
        rec = json.loads(record_path().read_text())
    except (OSError, ValueError):  # none recorded (a bad record is named by `relay cluster`)
        rec = {}
    with on_loopback() if rec.get("loopback") and rec.get("address") == address else contextlib.nullcontext():
        ray.init(address=address, **options)
    return address


def devices_that_fit(memory_bytes: float, gpu: float = 0.0, available: bool = True) -> int:
    """Device workers the Ray cluster has room for, node by node (a device cannot straddle nodes)."""
    per_node = state.available_resources_per_node() if available else state.total_resources_per_node()
    fit = 0
    for res in per_node.values():
        n = min(int(res.get("memory", 0) // memory_bytes), int(res.get("CPU", 0) / CPU_PER_DEVICE + 1e-9))
        if gpu:
            n = min(n, int(res.get("GPU", 0) / gpu + 1e-9))
        fit += n
    return fit


def place_workers(domain_of, first: int, n: int, host: str, memory_mb: float) -> tuple[list, list]:
    """Start workers first..n-1 (device i in scale-up domain domain_of(i)); returns (workers,
    placement groups). Refuses, naming both counts, when the cluster lacks room."""
    new = n - first
    mem = memory_mb * 2**20
    gpu = 0.0
    if host == "cuda":
        total_gpu = ray.cluster_resources().get("GPU", 0)
        if total_gpu <= 0:
            raise ConfigError("device = 'cuda' but the Ray cluster has no GPU; use device='cpu'")
        gpu = min(1.0, total_gpu / n)
    fit = devices_that_fit(mem, gpu)
    if fit < new:
        raise ConfigError(f"the Ray cluster has room for {fit} more device(s) (at {memory_mb} MB "
                         f"each, counted node by node), but {new} were asked (devices = {n}); use "
                         "fewer devices, a smaller memory_mb, or a larger cluster")
    bundle = {"CPU": CPU_PER_DEVICE, "memory": mem} | ({"GPU": gpu} if gpu else {})
    domains = {}
    for i in range(first, n):
        domains.setdefault(domain_of(i), []).append(i)
    workers, groups = [], []
    for members in domains.values():
        pg = placement_group([bundle] * len(members), strategy="PACK")
        if not ray.wait([pg.ready()], timeout=60)[0]:
            remove_placement_group(pg)
            raise RuntimeError(f"could not place {len(members)} device(s) on the Ray cluster within 60 s")
        groups.append(pg)
        for k, i in enumerate(members):
            strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=k)
            workers.append(RemoteWorker.options(  # a second thread answers pings and progress
                num_cpus=CPU_PER_DEVICE, num_gpus=gpu, memory=mem, scheduling_strategy=strategy,
                max_concurrency=2,  # queries while the first one works
            ).remote(i, host))
    return workers, groups


def release(workers: list, groups: list) -> None:
    for w in workers:
        try:
            ray.kill(w, no_restart=True)
        except Exception:  # already dead
            pass
    for pg in groups:
        try:
            remove_placement_group(pg)
        except Exception:
            pass


def wait_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    for pid in pids:
        while psutil.pid_exists(pid) and time.time() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
