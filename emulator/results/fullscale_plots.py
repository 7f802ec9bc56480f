"""The plots of a full-scale break-even (launch/fullscale.py), from its summary.json: throughput
against device count with the break-evens marked, the step breakdown per system, and the
sensitivity (tornado). matplotlib through plots.py, as every other plot."""

from __future__ import annotations

import textwrap

from relay.results.plots import _pyplot, save

PARTS = (("compute", "compute"), ("tensor_parallel", "exposed tensor parallel"),
         ("pipeline", "pipeline bubble + p2p"), ("expert_all_to_all", "expert all-to-all"),
         ("data_parallel", "exposed data parallel"))


def draw(out, summary: dict) -> list:
    drawn = [save(out, plot_throughput(summary), "throughput.png"),
             save(out, plot_breakdown(summary), "step_breakdown.png")]
    if any(run.get("sensitivity") for run in summary["workloads"]):
        drawn.append(save(out, plot_sensitivity(summary), "sensitivity.png"))
    return drawn


def plot_throughput(summary: dict):
    runs = summary["workloads"]
    fig, axes = _pyplot().subplots(1, len(runs), figsize=(6.5 * len(runs), 5.2), squeeze=False)
    for ax, run in zip(axes[0], runs):
        pts = {p["devices"]: p for p in run["curve"] if p["plan"]}
        xs = sorted(pts)
        ax.plot(xs, [pts[n]["tokens_per_s"] / 1e3 for n in xs], "o", ms=2.5, color="tab:red",
                label=f"{summary['slow']['chip']['display']}, best plan (every 48 devices, every count scanned)")
        below = [r["below"] for r in run["breakeven"] if r["below"] and r["below"]["plan"]]
        ax.plot([p["devices"] for p in below], [p["tokens_per_s"] / 1e3 for p in below], "v", mfc="none",
                color="tab:red", label="910C, one device fewer than each break-even (falls short)")
        fx = [r["fast"]["devices"] for r in run["breakeven"]]
        ax.plot(fx, [r["fast"]["tokens_per_s"] / 1e3 for r in run["breakeven"]], "s", ms=7, color="tab:green",
                label=f"{summary['fast']['chip']['display']}, NVL72 racks, best plan")
        for i, r in enumerate(run["breakeven"]):
            y = r["fast"]["tokens_per_s"] / 1e3
            ax.axhline(y, color="tab:green", ls=":", lw=0.8)
            if r["slow"]:
                ax.plot([r["devices"]], [y], "*", ms=14, color="black", label="break-even" if i == 0 else None)
                right = r["devices"] < 0.6 * max(xs + [r["devices"]])  # the label on the side with room
                prec = (r.get("precision") or {}).get("fast", "bf16")
                ax.annotate(f"{r['racks']} x NVL72 ({prec.upper()}) = {r['devices']} x 910C", (r["devices"], y),
                            textcoords="offset points", xytext=(10, -14) if right else (-10, 6),
                            ha="left" if right else "right", fontsize=8)
        ax.set_title(f"{run['workload']}, {run['tokens_per_step']:,} tokens per step")
        ax.set_xlabel("devices (910C on the line, B200 for the squares)")
        ax.set_ylabel("thousand tokens per emulated second")
        ax.grid(alpha=0.3)
    fig.suptitle("Training throughput against device count (emulated, analytic plan search)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=4)
    return fig


def plot_breakdown(summary: dict):
    runs = summary["workloads"]
    fig, axes = _pyplot().subplots(1, len(runs), figsize=(6.5 * len(runs), 4.8), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:purple", "tab:red", "tab:gray"]
    for ax, run in zip(axes[0], runs):
        r = run["breakeven"][0]
        bars = [(f"NVL72\n{r['fast']['devices']} B200", r["fast"])]
        if r["slow"]:
            bars.append((f"break-even\n{r['slow']['devices']} 910C", r["slow"]))
        full = next((p for p in run["curve"] if p["devices"] == summary["slow"]["devices"] and p["plan"]), None)
        if full and (not r["slow"] or full["devices"] != r["slow"]["devices"]):
            bars.append((f"CloudMatrix 384\n{full['devices']} 910C", full))
        for j, (label, p) in enumerate(bars):
            bottom = 0.0
            for (key, name), c in zip(PARTS, colors):
                v = p["breakdown"][key]
                ax.bar(j, v, bottom=bottom, color=c, width=0.6, label=name if j == 0 else None)
                bottom += v
            plan = textwrap.fill(p["plan"].replace(",", ", "), 26)
            ax.text(j, bottom, f"{bottom:.1f} s\n{plan}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
        ax.set_ylabel("emulated seconds per step")
        ax.set_ylim(0, 1.45 * max(p["step_s"] for _, p in bars))
        ax.set_title(f"{run['workload']}: the step of each best plan")
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("Step breakdown (emulated, slowest pipeline stage)")
    fig.tight_layout()
    return fig


def plot_sensitivity(summary: dict):
    runs = [run for run in summary["workloads"] if run.get("sensitivity")]
    fig, axes = _pyplot().subplots(1, len(runs), figsize=(6.5 * len(runs), 3.6), squeeze=False)
    for ax, run in zip(axes[0], runs):
        sens = run["sensitivity"]
        base = sens["base_devices"]
        rows = sens["rows"]
        for i, row in enumerate(rows):
            same, right = [], False  # right: a bar goes right of the base (the note then goes left)
            for end, c in (("low", "tab:blue"), ("high", "tab:orange")):
                n = row[f"{end}_devices"]
                if n is None:
                    ax.text(base, i, f" x{row[end]:g}: not reached", va="center", fontsize=7)
                    continue
                ax.barh(i, n - base, left=base, color=c, height=0.6,
                        label=f"{end} end of the input" if i == 0 else None)
                if n == base:
                    same.append(f"x{row[end]:g}")
                    continue
                right |= n > base
                ax.text(n, i, f" {n} (x{row[end]:g}) ", va="center", fontsize=7, ha="left" if n > base else "right")
            if same:  # beside the base, on the side no bar takes
                ax.text(base, i, f" {base} at {' and '.join(same)} ", va="center", fontsize=7, color="dimgray",
                        ha="right" if right else "left")
        ax.axvline(base, color="black", lw=1)
        ax.set_yticks(range(len(rows)), [r["what"] for r in rows], fontsize=8)
        ax.set_xlabel(f"break-even 910C devices against one NVL72 (emulated; catalog inputs: {base})")
        ax.set_title(run["workload"])
        ends = [base] + [r[f"{e}_devices"] for r in rows for e in ("low", "high") if r[f"{e}_devices"]]
        pad = 0.4 * (max(ends) - min(ends) + 40)
        ax.set_xlim(min(ends) - pad, max(ends) + pad)
        ax.set_ylim(-0.6, len(rows) - 0.2)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    handles = [h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]][:2]
    fig.legend(handles, ["low end of the input (x0.8)", "high end of the input (x1.2)"], fontsize=8,
               loc="lower center", ncol=2)
    fig.suptitle("Sensitivity of the break-even to uncertain inputs of the 910C side (emulated)", y=1.02)
    return fig
