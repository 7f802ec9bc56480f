"""Plots of results folders (PNG): throughput against devices, the step breakdown, loss, busbw.
The only module that imports matplotlib, and only when it draws."""

from __future__ import annotations

import io
from pathlib import Path


def _pyplot():
    """matplotlib, imported on the first plot: it costs about a second, and most commands that
    import this module (through the results writers) may never draw."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(out, fig, rel: str) -> Path:
    """Write `fig` as a PNG into results folder `out`, atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return out.write_bytes(rel, buf.getvalue())


def draw(out: ResultsDir, summary: dict) -> list[Path]:
    """(Re)draw every plot a summary supports."""
    drawn = []
    kind = summary["kind"]
    if kind in ("sweep", "breakeven") and summary["points"]:
        drawn.append(save(out, plot_throughput(summary), "throughput.png"))
        algs = [p["algorithm"] for p in summary["points"]]
        alg = "ring" if "ring" in algs else algs[0]
        chosen = sorted((p for p in summary["points"] if p["algorithm"] == alg),
                        key=lambda p: (p["chip"], p["devices"]))
        drawn.append(save(out, plot_breakdown(chosen, f"step time breakdown, {alg} (emulated)"),
                              "step_breakdown.png"))
    if kind == "run":
        drawn.append(save(out, plot_loss(summary), "loss.png"))
        drawn.append(save(out, plot_breakdown([dict(s, devices=summary["system"]["devices"],
                                                   chip=summary["system"]["chip"]["name"],
                                                   algorithm=f"step {s['step']}") for s in summary["steps"]]),
                              "step_breakdown.png"))
    if kind == "bench":
        drawn.append(save(out, plot_busbw(summary), "busbw.png"))
    return drawn


def _unit(points) -> tuple[str, str]:
    if any(p.get("tokens_per_s") for p in points):
        return "tokens_per_s", "tokens per emulated second"
    return "samples_per_s", "samples per emulated second"


STYLES = ["-", "--", ":", "-."]


def plot_throughput(summary: dict):
    points = summary["points"]
    key, label = _unit(points)
    fig, ax = _pyplot().subplots(figsize=(7.5, 4.8))
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
    fig, ax = _pyplot().subplots(figsize=(max(6.0, 0.55 * len(points) + 2), 4.5))
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
    fig, ax = _pyplot().subplots(figsize=(6.5, 4))
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
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
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
