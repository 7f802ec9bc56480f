"""Results folders: every run writes results/<name>/ with

    config.json    everything resolved: settings, systems with their chip figures, host
                   calibration, package versions, git commit
    steps.csv      per step of every real run (emulated figures, plus real wall_s)
    summary.json   what the plots and `relay report` are drawn from
    *.png          plots (throughput against devices, step-time breakdown, loss, busbw)

Files are written atomically (to a temporary name, then renamed), so a folder never holds a
half-written file.
"""

from __future__ import annotations

import atexit
import csv
import io
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy
import psutil
import ray
import torch
from relay.errors import ConfigError

UNITS = {"step_s": "emulated s", "compute_s": "emulated s", "comm_s": "emulated s",
         "exposed_comm_s": "emulated s", "other_s": "emulated s", "samples_per_s": "samples per emulated s",
         "tokens_per_s": "tokens per emulated s", "mfu": "fraction of dense BF16 peak",
         "energy_j": "J per step (emulated; power basis: the power_basis field)",
         "energy_per_sample_j": "J (emulated; power basis: the power_basis field)",
         "energy_per_token_j": "J (emulated; power basis: the power_basis field)",
         "power_basis": "'chip' (chip power alone) or 'system (all-in)' (rack power per device)",
         "wall_s": "real s (host)", "fidelity": "fraction (wall clock)",
         "time_us": "emulated us", "algbw_GBps": "emulated GB/s", "busbw_GBps": "emulated GB/s",
         "real_s": "real s (host)"}


class ResultsDir:
    """One results folder. While a command writes it, it holds `.lock` (the writer's pid), so a
    second command given the same name fails at once instead of mixing its files in. A folder
    this command made and left without a file (a run refused before it started) is removed
    again when it is released, with any folders made for it."""

    def __init__(self, root, name: str, lock: bool = True):
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"name = {name!r} is not a results folder name; use letters, digits, - and _")
        self.path = Path(root) / name
        self._made = _first_missing(self.path)  # the outermost folder mkdir makes (None: none)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = self.path / ".lock"
        if lock:
            self._take_lock()

    def _take_lock(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self._lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                atexit.register(self.release)
                ResultsDir.held.append(self)
                return
            except FileExistsError:
                try:
                    pid = int(self._lock.read_text() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise ConfigError(f"results folder {str(self.path)!r} is being written by another relay "
                                     f"(pid {pid}); choose another --name, or wait for it") from None
                self._lock.unlink(missing_ok=True)  # left by a process that is gone
        raise RuntimeError(f"could not lock results folder {str(self.path)!r}")

    held: list = []  # folders this process has locked

    @classmethod
    def release_all(cls) -> None:
        while cls.held:
            cls.held.pop().release()

    def release(self) -> None:
        try:
            if self._lock.read_text() == str(os.getpid()):
                self._lock.unlink()
        except OSError:
            pass
        if self._made is not None:
            _remove_if_empty(self.path, self._made)

    def write_bytes(self, rel: str, data: bytes) -> Path:
        target = self.path / rel
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{rel}.")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes it private; results are ordinary files
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
        return target

    def write_text(self, rel: str, text: str) -> Path:
        return self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj) -> Path:
        return self.write_text(rel, json.dumps(obj, indent=2, default=_jsonable) + "\n")

    def write_csv(self, rel: str, rows: list[dict], columns: list[str]) -> Path:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        return self.write_text(rel, buf.getvalue())

    def read_json(self, rel: str):
        return json.loads((self.path / rel).read_text())


_UMASK = os.umask(0)
os.umask(_UMASK)


def _first_missing(path: Path) -> Path | None:
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            return missing
        missing = p
    return missing


def _remove_if_empty(path: Path, top: Path) -> None:
    """Remove `path`'s tree if it holds no file, then its parents up to `top`, while empty."""
    if not path.is_dir() or any(p.is_file() or p.is_symlink() for p in path.rglob("*")):
        return
    try:
        for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            sub.rmdir()
    except OSError:  # a file appeared meanwhile: keep it
        return
    for p in (path, *path.parents):
        try:
            p.rmdir()
        except OSError:  # not empty (another run's folder beside it), or gone
            return
        if p == top:
            return


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _jsonable(x):
    if hasattr(x, "as_dict"):
        return x.as_dict()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


# ---------------------------------------------------------------- provenance
def environment(host=None) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": commit,
            "versions": {"relay": _version(), "python": platform.python_version(), "torch": torch.__version__,
                         "ray": ray.__version__, "numpy": numpy.__version__},
            "host": {"platform": platform.platform(), **(host.as_dict() if host else {})}}


def _version() -> str:
    try:
        return version("relay-emulator")
    except PackageNotFoundError:
        return "unknown"


def system_dict(system) -> dict:
    return {"name": system.name or "custom", "devices": system.devices, "domain": system.domain,
            "domains": system.domains, "scaleup_gbps": system.scaleup_gbps,
            "scaleup_latency_us": system.scaleup_latency_us, "scaleout_gbps": system.scaleout_gbps,
            "scaleout_latency_us": system.scaleout_latency_us, "power_w": system.power_w,
            "power_basis": system.power_basis,
            "chip": system.chip.as_dict()}


def fmt(x, scale: float = 1.0, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return f"{x * scale:.{digits}g}"
    return str(x)
