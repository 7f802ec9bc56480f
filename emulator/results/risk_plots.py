"""The tornado of a full-scale break-even's range (launch/fullscale_risk.py, from summary.json):
per workload, each uncertain input alone at the ends of its range, the others central, and the
sampled 10th-90th percentile band. matplotlib through plots.py, as every other plot."""

from __future__ import annotations

import textwrap

from relay.results.plots import _pyplot, save


def draw(out, summary: dict) -> list:
    runs = [run for run in summary["workloads"] if run.get("uncertainty")]
    return [save(out, plot_tornado(runs), "uncertainty_tornado.png")] if runs else []


def plot_tornado(runs: list):
    fig, axes = _pyplot().subplots(1, len(runs), figsize=(7.5 * len(runs), 4.6), squeeze=False)
    for ax, run in zip(axes[0], runs):
        u = run["uncertainty"]["throughput"]
        rows = [r for r in u["tornado"] if r["low_value"] != r["high_value"]][::-1]  # the widest on top
        base = u["point"]
        ends = [base] + [x for r in rows for x in (r["at_low"], r["at_high"]) if x]
        for i, r in enumerate(rows):
            for end, c in (("at_low", "tab:blue"), ("at_high", "tab:orange")):
                n = r[end]
                if n is None:
                    ax.text(base, i, f" {end[3:]} end: not reached", va="center", fontsize=7)
                    continue
                ax.barh(i, n - base, left=base, color=c, height=0.6,
                        label=f"input at the {end[3:]} end of its range" if i == 0 else None)
                if n != base:
                    ax.text(n, i, f" {n} ", va="center", fontsize=7, ha="left" if n > base else "right")
        if u["p10"] is not None and u["p90"] is not None:
            ax.axvspan(u["p10"], u["p90"], color="gray", alpha=0.15, label="10th-90th percentile, all inputs drawn")
        ax.axvline(base, color="black", lw=1)
        if u["p50"] is not None:
            ax.axvline(u["p50"], color="black", ls="--", lw=1, label=f"median ({u['p50']})")
        ax.set_yticks(range(len(rows)), [textwrap.fill(r["what"], 48) for r in rows], fontsize=7)
        ax.set_xlabel(f"break-even 910C devices against one NVL72 (emulated; central inputs: {base})")
        ax.set_title(f"{run['workload']} ({run['uncertainty']['samples']} samples)")
        ax.set_xlim(0.8 * min(ends + [u["p10"] or base]), 1.1 * max(ends + [u["p90"] or base]))
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Which uncertain input moves the break-even most (emulated)")
    fig.tight_layout()
    return fig
