"""Writing a run's results folder: config.json, steps.csv (and devices.csv for a launched program),
points.csv, summary.json, the trace and the plots."""

from __future__ import annotations

from relay.driver.experiment import ROW_FIELDS
from relay.driver.metrics import STEP_COLUMNS
from relay.driver.programs import DEVICE_COLUMNS
from relay.results.folder import UNITS, ResultsDir, system_dict
from relay.results.plots import draw
from relay.results.trace import chrome_trace, launch_trace
from relay.device.backend.steps import STEP_COLUMNS as LAUNCH_STEP_COLUMNS
from relay.device.backend.steps import UNITS as STEP_UNITS


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


def write_bench(out: ResultsDir, config: dict, rows: list[dict], system, primitive: str) -> dict:
    out.write_json("config.json", config)
    out.write_csv("steps.csv", rows, list(rows[0]) if rows else ["size_bytes"])
    summary = {"kind": "bench", "name": out.path.name, "units": UNITS, "rows": rows, "primitive": primitive,
               "system": system.describe(), "link_gbps": system.scaleup_gbps if system.domains == 1 else
               system.scaleout_gbps}
    out.write_json("summary.json", summary)
    draw(out, summary)
    return summary


def write_launch(out: ResultsDir, config: dict, result) -> dict:
    """A launched program's folder: config.json, devices.csv, steps.csv (a row per device and
    optimizer step; only the header for a program without one), summary.json and trace.json."""
    out.write_json("config.json", config)
    out.write_csv("devices.csv", result.rows(), DEVICE_COLUMNS + ["tokens", "samples"])
    out.write_csv("steps.csv", result.step_rows(), LAUNCH_STEP_COLUMNS)
    summary = {"kind": "launch", "name": out.path.name, "units": UNITS | STEP_UNITS | {"emulated_s": "emulated s"},
               "summary": result.summary(), "devices": result.rows(), "steps": result.steps()}
    out.write_json("summary.json", summary)
    out.write_json("trace.json", launch_trace(result))
    return summary
