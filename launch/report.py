"""`relay report`: redraw a results folder's plots and print its summary."""

from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from relay.errors import ConfigError
from relay.launch.breakeven import _settings_of, breakeven_table
from relay.launch.fullscale import table as fullscale_table
from relay.launch.fullscale_summary import summary_md as fullscale_md
from relay.launch.run import run_table
from relay.launch.summary import summary_md
from relay.launch.sweep import points_table
from relay.results.folder import ResultsDir, fmt
from relay.results.fullscale_plots import draw as fullscale_draw
from relay.results.plots import draw


def cmd_report(args) -> None:
    path = Path(args.path)
    if not (path / "summary.json").exists():
        raise ConfigError(f"{str(path)!r} is not a results folder (no summary.json); give results/<name>")
    out = ResultsDir(path.parent, path.name)
    summary = out.read_json("summary.json")
    kind = summary["kind"]
    drawn = fullscale_draw(out, summary) if kind == "fullscale" else draw(out, summary)
    print(f"# relay report: {path} ({kind})")
    if kind == "run":
        config = out.read_json("config.json")["training"]
        print(tabulate(run_table(summary["summary"], config), headers=["figure", "value", "unit"],
                       disable_numparse=True))
    elif kind in ("sweep", "breakeven"):
        print(points_table(summary["points"]))
        if kind == "breakeven":
            print()
            print(breakeven_table(summary["breakeven"]))
            out.write_text("summary.md", summary_md(summary, _settings_of(out.read_json("config.json"))))
    elif kind == "fullscale":
        print(fullscale_table(summary))
        out.write_text("summary.md", fullscale_md(summary))
    elif kind == "bench":
        print(tabulate([[r["size_bytes"], r["algorithm"], fmt(r["time_us"]), fmt(r["busbw_GBps"])]
                        for r in summary["rows"]],
                       headers=["size (B)", "algorithm", "emul time (us)", "emul busbw (GB/s)"], disable_numparse=True))
    print("# plots: " + ", ".join(p.name for p in drawn))
