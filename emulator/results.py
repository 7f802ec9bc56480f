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
from pathlib import Path

import matplotlib

from emulator.errors import ConfigError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from emulator.trainer import STEP_COLUMNS  # noqa: E402

UNITS = {"step_s": "emulated s", "compute_s": "emulated s", "comm_s": "emulated s",
         "exposed_comm_s": "emulated s", "other_s": "emulated s", "samples_per_s": "samples per emulated s",
         "tokens_per_s": "tokens per emulated s", "mfu": "fraction of dense BF16 peak",
         "energy_j": "J per step (emulated; power basis: the power_basis field)",
         "energy_per_sample_j": "J (emulated; power basis: the power_basis field)",
         "energy_per_token_j": "J (emulated; power basis: the power_basis field)",
         "power_basis": "'chip' (chip power alone) or 'system (all-in)' (rack power per device)", "wall_s": "real s (host)", "fidelity": "fraction (wall clock)",
         "time_us": "emulated us", "algbw_GBps": "emulated GB/s", "busbw_GBps": "emulated GB/s",
         "real_s": "real s (host)"}


class ResultsDir:
    """One results folder. While a command writes it, it holds `.lock` (the writer's pid), so a
    second command given the same name fails at once instead of mixing its files in."""

    def __init__(self, root, name: str, lock: bool = True):
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"name = {name!r} is not a results folder name; use letters, digits, - and _")
        self.path = Path(root) / name
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

    def save(self, fig, rel: str) -> Path:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        return self.write_bytes(rel, buf.getvalue())

    def read_json(self, rel: str):
        return json.loads((self.path / rel).read_text())


_UMASK = os.umask(0)
os.umask(_UMASK)


def _alive(pid: int) -> bool:
    import psutil
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
    import numpy
    import ray
    import torch
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
    from importlib.metadata import PackageNotFoundError, version
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


# ---------------------------------------------------------------- writing
def step_rows(points) -> list[dict]:
    """Every real run's steps, each row tagged with its point."""
    rows = []
    for i, p in enumerate(points):
        if p.result is None:
            continue
        for s in p.result.steps:
            rows.append({"point": i, "system": p.row["system"], "chip": p.row["chip"],
                         "devices": p.row["devices"], "algorithm": p.row["algorithm"], **s})
    return rows


POINT_COLUMNS = ["system", "chip", "devices", "domain", "algorithm", "per_device_batch", "batch_scale",
                 "global_batch", "predicted", "power_basis"]


def write_points(out: ResultsDir, kind: str, config: dict, points, extra: dict | None = None,
                 plots: bool = True, earlier_steps: list[dict] | None = None) -> dict:
    """config.json, steps.csv, points.csv, summary.json (and the plots) of a list of points.
    earlier_steps: steps.csv rows of points measured by an earlier, interrupted command."""
    from emulator.experiment import ROW_FIELDS
    out.write_json("config.json", config)
    columns = ["point", "system", "chip", "devices", "algorithm"] + STEP_COLUMNS
    index = {(p.row["system"], p.row["chip"], str(p.row["devices"]), p.row["algorithm"]): i
             for i, p in enumerate(points)}
    earlier = [dict(r, point=index[r["system"], r["chip"], str(r["devices"]), r["algorithm"]])
               for r in earlier_steps or [] if (r["system"], r["chip"], str(r["devices"]), r["algorithm"]) in index]
    out.write_csv("steps.csv", sorted(earlier + step_rows(points), key=lambda r: int(r["point"])), columns)
    out.write_csv("points.csv", [p.row for p in points], POINT_COLUMNS + ROW_FIELDS)
    summary = {"kind": kind, "name": out.path.name, "units": UNITS, "points": [p.row for p in points],
               **(extra or {})}
    out.write_json("summary.json", summary)
    if plots:
        draw(out, summary)
    return summary


def write_run(out: ResultsDir, config: dict, result, system, trace: bool = False) -> dict:
    out.write_json("config.json", config)
    out.write_csv("steps.csv", result.steps, STEP_COLUMNS)
    summary = {"kind": "run", "name": out.path.name, "units": UNITS, "summary": result.summary(),
               "steps": result.steps, "loss_floor": result.config.get("loss_floor"),
               "system": system_dict(system)}
    out.write_json("summary.json", summary)
    if trace:
        out.write_json("trace.json", chrome_trace(result, system))
    draw(out, summary)
    return summary


def chrome_trace(result, system) -> dict:
    """A Chrome-trace timeline (opens in Perfetto or chrome://tracing): one process per device,
    a compute lane and a communication lane, times in emulated microseconds."""
    events = []
    for d, rows in enumerate(result.per_device):
        events.append({"ph": "M", "name": "process_name", "pid": d,
                       "args": {"name": f"device {d} ({system.chip.name}, emulated time)"}})
        events.append({"ph": "M", "name": "thread_name", "pid": d, "tid": 0, "args": {"name": "compute lane"}})
        events.append({"ph": "M", "name": "thread_name", "pid": d, "tid": 1,
                       "args": {"name": "communication lane"}})
        for r in rows:
            for name, spans in r["spans"].items():
                tid = 1 if name == "all-reduce" else 0
                for a, b in (spans if tid else [spans]):
                    events.append({"ph": "X", "name": f"{name} (step {r['step']})", "pid": d, "tid": tid,
                                   "ts": a * 1e6, "dur": max(b - a, 0.0) * 1e6, "args": {"step": r["step"]}})
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"clock": result.config["clock"], "time": "emulated"}}


# ---------------------------------------------------------------- plots
def draw(out: ResultsDir, summary: dict) -> list[Path]:
    """(Re)draw every plot a summary supports."""
    drawn = []
    kind = summary["kind"]
    if kind in ("sweep", "breakeven") and summary["points"]:
        drawn.append(out.save(plot_throughput(summary), "throughput.png"))
        algs = [p["algorithm"] for p in summary["points"]]
        alg = "ring" if "ring" in algs else algs[0]
        chosen = sorted((p for p in summary["points"] if p["algorithm"] == alg),
                        key=lambda p: (p["chip"], p["devices"]))
        drawn.append(out.save(plot_breakdown(chosen, f"step time breakdown, {alg} (emulated)"),
                              "step_breakdown.png"))
    if kind == "run":
        drawn.append(out.save(plot_loss(summary), "loss.png"))
        drawn.append(out.save(plot_breakdown([dict(s, devices=summary["system"]["devices"],
                                                   chip=summary["system"]["chip"]["name"],
                                                   algorithm=f"step {s['step']}") for s in summary["steps"]]),
                              "step_breakdown.png"))
    if kind == "bench":
        drawn.append(out.save(plot_busbw(summary), "busbw.png"))
    return drawn


def _unit(points) -> tuple[str, str]:
    if any(p.get("tokens_per_s") for p in points):
        return "tokens_per_s", "tokens per emulated second"
    return "samples_per_s", "samples per emulated second"


STYLES = ["-", "--", ":", "-."]


def plot_throughput(summary: dict):
    points = summary["points"]
    key, label = _unit(points)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series = {}
    for p in points:
        series.setdefault((p["chip"], p["system"], p["algorithm"]), []).append(p)
    algorithms = sorted({p["algorithm"] for p in points})
    colors = {}
    for (chip, name, alg), ps in sorted(series.items()):
        ps = sorted(ps, key=lambda p: p["devices"])
        style = STYLES[algorithms.index(alg) % len(STYLES)]
        line, = ax.plot([p["devices"] for p in ps], [p[key] for p in ps], style, color=colors.get(chip),
                        label=f"{chip} ({name}), {alg}")
        colors[chip] = line.get_color()
        real = [p for p in ps if not p["predicted"]]
        pred = [p for p in ps if p["predicted"]]
        ax.plot([p["devices"] for p in real], [p[key] for p in real], "o", ms=4, color=colors[chip])
        if pred:
            ax.plot([p["devices"] for p in pred], [p[key] for p in pred], "o", mfc="none", color=colors[chip],
                    label=f"{chip}, {alg}: predicted (too large for this host)")
    # the fast system's level and the break-even point, one label for algorithms that agree
    marks = {}
    for b in summary.get("breakeven", []):
        if b["metric"] == "throughput":
            marks.setdefault(b["break_even_devices"], []).append(b)
    for n, bs in marks.items():
        algs = ", ".join(x["algorithm"] for x in bs)
        level = sum(x["fast_throughput"] for x in bs) / len(bs)
        ax.axhline(level, ls="--", lw=1, color="k")
        ax.annotate(f"{bs[0]['fast']} ({algs})", (0.01, level), xycoords=("axes fraction", "data"),
                    va="bottom", fontsize=8)
        if n:
            y = max(x["slow_throughput"] for x in bs)
            ax.plot([n], [y], "*", ms=16, color="crimson", zorder=5)
            ax.annotate(f"break-even: {n} devices ({algs})", (n, y), textcoords="offset points",
                        xytext=(8, -14), fontsize=8, color="crimson")
    if summary.get("breakeven"):
        naive = summary["breakeven"][0]["naive_devices"]
        ax.axvline(naive, ls=":", lw=1, color="gray")
        ax.annotate(f"naive count from the FLOPS ratio ({naive:.1f})", (naive, 0.98),
                    xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=8, color="gray")
    ax.set_xlabel("devices")
    ax.set_ylabel(f"throughput ({label})")
    ax.set_title(f"{summary['name']}: throughput against device count (emulated)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_breakdown(points: list[dict], title: str = "step time breakdown (emulated)"):
    labels = [f"{p['chip']} x{p['devices']}\n{p['algorithm']}" + (" (pred.)" if p.get("predicted") else "")
              for p in points]
    ms = lambda k: [1e3 * (p.get(k) or 0.0) for p in points]  # noqa: E731
    compute, exposed, other = ms("compute_s"), ms("exposed_comm_s"), ms("other_s")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(points) + 2), 4.5))
    x = range(len(points))
    ax.bar(x, compute, label="compute")
    ax.bar(x, exposed, bottom=compute, label="exposed communication")
    ax.bar(x, other, bottom=[a + b for a, b in zip(compute, exposed)], label="other (waiting for slower devices)")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    for i, p in enumerate(points):
        if p.get("step_s"):
            share = 100 * (p.get("exposed_comm_s") or 0.0) / p["step_s"]
            ax.annotate(f"{share:.1f}%", (i, compute[i] + exposed[i] + other[i]), ha="center", va="bottom",
                        fontsize=6, color="tab:orange")
    ax.margins(y=0.08)
    ax.set_ylabel("emulated step time (ms)")
    ax.set_title(title + "; orange figures: exposed communication, % of the step", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=3, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_loss(summary: dict):
    steps = summary["steps"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    t, xs = 0.0, []
    for s in steps:
        t += s["step_s"]
        xs.append(t * 1e3)
    ax.plot(xs, [s["loss"] for s in steps], "-o", ms=3, label="training loss")
    if summary.get("loss_floor") is not None:
        ax.axhline(summary["loss_floor"], ls="--", color="gray", label="best achievable (entropy floor)")
    ax.set_xlabel("emulated time (ms)")
    ax.set_ylabel("loss")
    ax.set_title(f"{summary['name']}: loss against emulated time")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def plot_busbw(summary: dict):
    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for alg in sorted({r["algorithm"] for r in rows}):
        rs = [r for r in rows if r["algorithm"] == alg]
        ax.plot([r["size_bytes"] for r in rs], [r["busbw_GBps"] for r in rs], "-o", ms=3, label=alg)
    link = summary.get("link_gbps")
    if link:
        ax.axhline(link, ls="--", color="gray", label=f"link bandwidth ({link:g} GB/s per direction)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (emulated GB/s)")
    ax.set_title(f"{summary.get('primitive', 'all_reduce')}: {summary.get('system', '')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def write_bench(out: ResultsDir, config: dict, rows: list[dict], system, primitive: str) -> dict:
    out.write_json("config.json", config)
    out.write_csv("steps.csv", rows, list(rows[0]) if rows else ["size_bytes"])
    summary = {"kind": "bench", "name": out.path.name, "units": UNITS, "rows": rows, "primitive": primitive,
               "system": system.describe(), "link_gbps": system.scaleup_gbps if system.domains == 1 else
               system.scaleout_gbps}
    out.write_json("summary.json", summary)
    draw(out, summary)
    return summary


def fmt(x, scale: float = 1.0, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return f"{x * scale:.{digits}g}"
    return str(x)
