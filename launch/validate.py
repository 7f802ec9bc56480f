"""`relay validate`: Relay's figures against published measurements.

For each row of emulator/hardware/published.toml (system, primitive or kernel, size, published
figure, unit, source), Relay's figure in the same unit: collectives from the local executor on the
calibrated fabric (nccl-tests' busbw in GB/s, or time in us), GEMMs from the cost model (TFLOPS).
Then the ratio and the summary: median and geometric-mean absolute error of the rows not used for
fitting (a `fit` row set a calibrated parameter, so its error says nothing of the model), the worst
row, and a one-line verdict against the target (that median |error| <= 10%, no row beyond 30%);
exit status 1 on a miss. `--update` rewrites the table's `relay` column (the regression test's expected figures).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from relay import System, chips
from relay.collectives import Fabric, busbw_factor, resolve, simulate
from relay.errors import ConfigError
from relay.kernels.cost import CostModel

PUBLISHED = chips.CATALOG.with_name("published.toml")  # beside the chip catalog, in relay.hardware
TARGET_MEDIAN, TARGET_WORST = 0.10, 0.30  # |relay / published - 1|
REGRESSION_TOL = 0.01  # a model change may move a figure by this much before the table must follow
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


@dataclass(frozen=True)
class Row:
    id: str
    system: str  # as measured, in words
    chip: str
    devices: int
    kind: str  # a primitive (all_reduce, ...) or "matmul"
    metric: str  # busbw (GB/s), time (us) or tflops
    published: float
    unit: str
    source: str
    algorithm: str = "auto"  # what the measurement ran ("auto": the library's choice)
    size: str = ""  # bytes of the nccl-tests buffer, e.g. "16G"
    shape: tuple = ()  # M, N, K of a GEMM
    precision: str = "bf16"  # a GEMM's operands: "bf16", or "fp8" (torch._scaled_mm, per-tensor scales)
    domain: int | None = None  # devices per scale-up domain; None: one domain
    scaleout_gbps: float | None = None
    scaleout_fabric: str | None = None
    note: str = ""
    fit: bool = False  # its figure set a calibrated parameter
    relay: float = 0.0  # Relay's figure when the table was last updated


def nbytes(size: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", size)
    if not m:
        raise ConfigError(f"size = {size!r} is not a byte count; write e.g. 8, 1M, 16G")
    return int(m.group(1)) * UNITS[m.group(2)]


def load(path: Path | str = PUBLISHED) -> list[Row]:
    with open(path, "rb") as fh:
        rows = [Row(**{**r, "shape": tuple(r.get("shape", ()))}) for r in tomllib.load(fh)["row"]]
    for r in rows:
        if r.precision not in ("bf16", "fp8") or (r.precision != "bf16" and r.kind != "matmul"):
            raise ConfigError(f"{path}: row {r.id!r}: precision = {r.precision!r} is invalid; give \"bf16\" or, on a "
                              "matmul row, \"fp8\" (torch._scaled_mm with per-tensor scales)")
    ids = [r.id for r in rows]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ConfigError(f"{path}: duplicate row id(s) {', '.join(sorted(dup))}")
    return rows


def relay_figure(row: Row) -> tuple[float, str]:
    """Relay's figure for a row in the row's unit, and what Relay ran (algorithm/protocol)."""
    if row.kind == "matmul":
        m, n, k = row.shape
        cost = CostModel(chips.get(row.chip), "bf16").matmul_cost(m, k, n, fp8=row.precision == "fp8")
        return cost.flops / cost.seconds / 1e12, "cost model"
    links = {"scaleout_gbps": row.scaleout_gbps} if row.scaleout_gbps else {}
    system = System(row.chip, row.devices, domain=row.domain, **links)
    fabric = Fabric.of(system, scaleout=row.scaleout_fabric)
    size = nbytes(row.size)
    alg, tuned = resolve(row.kind, row.algorithm, size, system, fabric.with_(elem_bytes=4))
    t = simulate(row.kind, row.algorithm, size, system, dtype="float32", fabric=fabric)
    ran = f"{alg}/{tuned.protocol}"
    if row.metric == "time":
        return t * 1e6, ran
    return size / t / 1e9 * busbw_factor(row.kind, row.devices), ran


def evaluate(rows: list[Row]) -> list[dict]:
    out = []
    for r in rows:
        fig, ran = relay_figure(r)
        out.append({"row": r, "relay": fig, "ran": ran, "ratio": fig / r.published,
                    "err": abs(fig / r.published - 1)})
    return out


def summary(results: list[dict]) -> dict:
    """The median and geometric-mean |error| of the rows not used for fitting (a fit row's error
    is small by construction, so counting it flatters the model; all rows when every one is a fit
    row), the median with the fit rows too, and the worst row and those beyond TARGET_WORST of all."""
    held_out = [x for x in results if not x["row"].fit] or results
    errs = [x["err"] for x in held_out]
    worst = max(results, key=lambda x: x["err"])
    return {"rows": len(results), "systems": len({x["row"].system for x in results}),
            "held_out": len(held_out) if held_out is not results else 0,
            "median_abs_err": statistics.median(errs),
            "geomean_abs_err": math.exp(statistics.fmean(math.log(max(e, 1e-6)) for e in errs)),
            "median_abs_err_with_fit": statistics.median(x["err"] for x in results),
            "worst_id": worst["row"].id, "worst_abs_err": worst["err"],
            "beyond_30pct": [x["row"].id for x in results if x["err"] > TARGET_WORST]}


def _over(s: dict) -> str:
    if s["held_out"]:
        return f"the {s['held_out']} rows not used for fitting"
    return f"all {s['rows']} rows (every one a fit row)"


def verdict(s: dict) -> tuple[bool, str]:
    ok = s["median_abs_err"] <= TARGET_MEDIAN and not s["beyond_30pct"]
    what = (f"median |error| {s['median_abs_err']:.1%} over {_over(s)} (target <= {TARGET_MEDIAN:.0%}), "
            f"{len(s['beyond_30pct'])} row(s) beyond {TARGET_WORST:.0%}")
    return ok, ("PASS: " if ok else "MISS: ") + what


def update(path: Path | str, results: list[dict]) -> None:
    """Rewrite each row's `relay = ...` line with the current figure (4 significant digits)."""
    text = Path(path).read_text()
    by_id = {x["row"].id: x["relay"] for x in results}
    out, current = [], None
    for line in text.split("\n"):
        m = re.match(r'id = "(.*)"$', line)
        if m:
            current = m.group(1)
        if line.startswith("relay = ") and current in by_id:
            line = f"relay = {float(f'{by_id[current]:.4g}')!r}"
        out.append(line)
    Path(path).write_text("\n".join(out))


def report(results: list[dict]) -> str:
    table = [[x["row"].id, (f"matmul {x['row'].precision}" if x["row"].precision != "bf16" else "matmul")
              if x["row"].kind == "matmul" else f"{x['row'].kind} {x['row'].size}",
              x["ran"], f"{x['row'].published:g}", f"{x['relay']:.4g}", x["row"].unit, f"{x['ratio']:.3f}",
              f"{x['err']:.1%}", "fit" if x["row"].fit else ""] for x in results]
    return tabulate(table, headers=["row", "what", "relay ran", "published", "relay (emulated)", "unit",
                                    "ratio", "|error|", ""], disable_numparse=True)


def cmd_validate(args) -> int:
    if args.programs and (not args.training or args.json):
        raise ConfigError("option --programs is given without --training (or with --json); it launches the "
                          "programs of training.toml's rows and prints their lines beside that table: add --training "
                          "(and drop --json)")
    if args.training:  # published training runs (emulator/hardware/training.toml)
        from relay.launch import validate_training
        return validate_training.cmd_training(args)
    if args.inference:  # published serving throughput (emulator/hardware/serving.toml)
        from relay.launch import validate_serving
        return validate_serving.cmd_inference(args)
    rows = load(args.table or PUBLISHED)
    if args.only:
        rows = [r for r in rows if re.search(args.only, r.id)]
    results = evaluate(rows)
    s = summary(results)
    ok, line = verdict(s)
    if args.update:
        update(args.table or PUBLISHED, results)
    if args.json:
        print(json.dumps({"rows": [{"id": x["row"].id, "published": x["row"].published, "unit": x["row"].unit,
                                    "relay": x["relay"], "ratio": x["ratio"], "ran": x["ran"],
                                    "source": x["row"].source} for x in results],
                          "summary": s, "verdict": line}, indent=2))
    else:
        print("# relay validate: Relay's emulated figures (calibrated model) against published measurements")
        print(f"# table: {args.table or PUBLISHED}; 'fit' rows set a calibrated parameter, the rest validate it")
        print(report(results))
        print(f"# {s['rows']} rows, {s['systems']} systems: median |error| {s['median_abs_err']:.1%} and "
              f"geometric-mean {s['geomean_abs_err']:.1%} over {_over(s)} (with the fit rows: median "
              f"{s['median_abs_err_with_fit']:.1%}); worst {s['worst_id']} {s['worst_abs_err']:.1%}")
        if s["beyond_30pct"]:
            print(f"# beyond 30%: {', '.join(s['beyond_30pct'])}")
            for x in results:
                if x["err"] > TARGET_WORST and x["row"].note:
                    print(f"#   {x['row'].id}: {x['row'].note}")
        if args.update:
            print(f"# updated the relay column of {args.table or PUBLISHED}")
        print(line)
    return 0 if ok else 1


def add_parser(sub) -> None:
    v = sub.add_parser("validate", help="Relay's figures against published measurements "
                       "(nccl-tests, GEMM; --training: end-to-end training runs)")
    v.add_argument("--table", help="a published-measurements table (default emulator/hardware/published.toml, "
                   "or training.toml with --training)")
    v.add_argument("--training", action="store_true", help="published end-to-end training throughput instead: "
                   "each run's layout costed by the plan model, the planner's best plan beside it")
    v.add_argument("--inference", action="store_true", help="published serving throughput of DeepSeek-V3/R1 "
                   "instead (prefill and decode tokens/s per device; rows marked inference)")
    v.add_argument("--no-best", action="store_true", help="with --training: skip the planner's search for "
                   "the best plan (it takes a minute on the large MoE rows)")
    v.add_argument("--programs", action="store_true", help="with --training: also launch each row's own program "
                   "(torchtitan) unmodified on fake tensors and print its own tps / MFU / memory lines (slow)")
    v.add_argument("--only", help="rows whose id matches this regular expression")
    v.add_argument("--update", action="store_true", help="rewrite the table's expected relay figures")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=lambda args: sys.exit(cmd_validate(args)))
