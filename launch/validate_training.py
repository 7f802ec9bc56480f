"""`relay validate --training`: Relay's emulated training step against published end-to-end training
throughput. Each row of emulator/hardware/training.toml is a published run (model, chips, fabric, layout,
batch, sequence, precision, recompute, framework, figure, source). Relay costs the *published* layout on
the row's System with the analytic plan model (planner.cost, as `relay plan --parallel`; its kernels and
overlaps as the row's framework runs them: training_frameworks.py) and the planner's best plan beside it,
in the row's unit. What the plan model cannot cost yet is never dropped in silence: `layout` maps a row
to the nearest plan it can cost and names every approximation (PLANNER_COSTS lists the features); a row
that does not map is "not run", with the reason. The verdict is the issue's target: median |error| <= 10%
and no row beyond 25%, over the rows that ran and are not `fit` rows."""

from __future__ import annotations

import json
import re
import statistics

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from tabulate import tabulate

from relay import System, chips
from relay.analytic import planner
from relay.analytic.footprint import GB, config_of, footprint
from relay.errors import ConfigError
from relay.launch import training_frameworks, validate
from relay.launch.training_frameworks import FRAMEWORKS, FUSED_EXTRAS, MODELLED, attention_of, dispatch_of, kernels_of
from relay.parallel import Parallel
from relay.workloads import analytic
from relay.workloads import get as get_workload

TRAINING = chips.CATALOG.with_name("training.toml")  # beside the chip catalog, in relay.hardware
TARGET_MEDIAN, TARGET_WORST = 0.10, 0.25  # |relay / published - 1| (issue 26's acceptance)
METRICS = {"tokens_per_gpu": "tokens/s/GPU", "tflops_per_gpu": "TFLOPS/GPU"}
PRECISIONS, RECOMPUTES = ("bf16", "fp8"), ("none", "full", "selective")
# Layout features the analytic plan model (relay.analytic.planner.cost) costs today. `layout` approximates each False
# one by the nearest plan it can cost, and says so on the row; True: the planner costs it, `layout` passes it through.
PLANNER_COSTS = {
    "stages": True,  # virtual pipeline stages (interleaved 1F1B)
    "cp": False,  # context parallel: no Parallel dimension yet (True passes cp= to Parallel)
    "fp8": True,  # FP8 compute (torchao's float8 Linear GEMMs)
    "selective": True,  # selective recompute, as torchtitan's op policy (ac=op)
    "accumulation": True,  # gradient accumulation without a pipeline (microbatches with pp = 1)
}


@dataclass(frozen=True)
class TrainingRow:
    id: str
    model: str  # the source's name for it
    workload: str  # the Relay workload it maps to
    chip: str
    devices: int
    system: str  # as measured, in words
    framework: str  # FRAMEWORKS: what ran it (sets the fusion mode and Megatron's overlaps)
    domain: int  # devices per scale-up domain
    tp: int
    pp: int
    stages: int  # virtual pipeline stages per rank (1: none)
    cp: int
    dp: int  # data-parallel replicas: devices / (tp pp cp)
    ep: int  # expert parallel, inside dp
    fsdp: bool
    global_batch: int  # samples per step
    micro_batch: int  # samples per forward pass
    seq_len: int
    precision: str  # PRECISIONS
    recompute: str  # RECOMPUTES
    metric: str  # METRICS
    published: float
    unit: str
    source: str
    extras: tuple = ()  # what else the run used (torch.compile, ...)
    note: str = ""
    scaleout_gbps: float | None = None
    fit: bool = False
    relay: float = 0.0  # Relay's figure at the published layout when the table was last updated
    program: str = ""  # the program that ran it, as --programs launches it (validate_programs)
    schedules: int = 1  # pipeline schedules a step runs (gradient accumulation over a pipeline: AutoModel's GA)


def _check(r: TrainingRow, path) -> None:
    bad = lambda field, fix: ConfigError(  # noqa: E731
        f"{path}: row {r.id!r}: {field} = {getattr(r, field)!r} is invalid; {fix}")
    for f in ("devices", "domain", "tp", "pp", "stages", "cp", "dp", "ep", "global_batch", "micro_batch", "seq_len"):
        v = getattr(r, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(f, "give an integer >= 1")
    for f, choices in (("framework", FRAMEWORKS), ("precision", PRECISIONS), ("recompute", RECOMPUTES)):
        if getattr(r, f) not in choices:
            raise bad(f, f"give one of {', '.join(choices)}")
    if METRICS.get(r.metric) != r.unit:
        raise bad("metric", "give tokens_per_gpu with unit 'tokens/s/GPU' or tflops_per_gpu with 'TFLOPS/GPU'")
    if r.tp * r.pp * r.cp * r.dp != r.devices:
        raise bad("dp", f"tp x pp x cp x dp must be devices ({r.devices}); give dp = devices / (tp pp cp)")
    if r.seq_len % r.cp:
        raise bad("seq_len", f"context parallel splits the sequence {r.cp} ways; give a multiple of cp")
    if r.global_batch % (r.dp * r.micro_batch):
        raise bad("global_batch", f"give a multiple of dp x micro_batch ({r.dp * r.micro_batch})")
    n = r.global_batch // (r.dp * r.micro_batch)  # micro-batches a replica runs a step
    if type(r.schedules) is not int or r.schedules < 1 or n % r.schedules or (r.schedules > 1 and r.pp == 1):
        raise bad("schedules", f"give 1, or with pp > 1 a divisor of its {n} micro-batches")
    if r.dp % r.ep:
        raise bad("ep", f"expert parallelism is counted inside dp ({r.dp}); give ep dividing it")
    if not (r.published > 0 and r.source.startswith("http")):
        raise bad("source", "give the published figure (> 0) and a checkable URL with the table or section")
    chips.get(r.chip)  # a ConfigError naming the catalog's chips
    get_workload(r.workload)


def load(path: Path | str = TRAINING) -> list[TrainingRow]:
    known = {f.name for f in fields(TrainingRow)}
    with open(path, "rb") as fh:
        raw = tomllib.load(fh)["row"]
    rows = []
    for r in raw:
        if unknown := sorted(set(r) - known):
            raise ConfigError(f"{path}: row {r.get('id')!r}: unknown field(s) {', '.join(unknown)}; "
                              f"the fields are {', '.join(sorted(known))}")
        rows.append(TrainingRow(**{**r, "extras": tuple(r.get("extras", ()))}))
    ids = [r.id for r in rows]
    if dup := sorted({i for i in ids if ids.count(i) > 1}):
        raise ConfigError(f"{path}: duplicate row id(s) {', '.join(dup)}")
    for r in rows:
        _check(r, path)
    return rows


@dataclass(frozen=True)
class Layout:
    """What Relay runs for a row: a plan it can cost and the approximations that took."""

    plan: Parallel
    dtype: str
    seq_len: int  # tokens per sample per device as Relay runs it (the row's, or its share under cp)
    devices: int  # devices Relay runs (the row's, or one CP rank of each group)
    approximations: tuple  # each a sentence: "<published feature> run as <what Relay ran>"
    fusion: str = "eager"  # how the blocks' kernels are charged (kernels/fusion.py)
    overlap: tuple = ()  # Megatron's communication overlaps costed (analytic/megatron.py)
    cp: int = 1  # context-parallel ranks each costed device stands for (their optimizer shards: footprint)


def layout(row: TrainingRow, costs: dict = PLANNER_COSTS) -> Layout:
    """The nearest plan the plan model costs for the row's published layout (see PLANNER_COSTS)."""
    out, dp, seq_len, devices, ranks = [], row.dp, row.seq_len, row.devices, 1
    if row.cp > 1 and not costs["cp"] and row.pp == 1:
        dp *= row.cp
        out.append(f"cp={row.cp} run as {row.cp}x data parallel (dp={dp}: whole sequences, the same tokens and "
                   "attention FLOPs per device; no CP exchange of keys and values)")
    elif row.cp > 1 and not costs["cp"]:  # folding cp into dp would cut the pipeline's micro-batches
        seq_len, devices, ranks = seq_len // row.cp, devices // row.cp, row.cp
        out.append(f"cp={row.cp} run as one CP rank per group: {devices} devices on sequences of {seq_len} tokens "
                   f"(the pipeline's micro-batches kept; attention FLOPs 1/{row.cp} of CP's; no CP exchange of K, V; "
                   "the step's tokens counted over all devices; optimizer state sharded over dp x cp, timed over dp)")
    stages = None
    if row.stages > 1:
        if costs["stages"]:
            stages = row.stages
            layers = config_of(row.workload, row.seq_len).n_layers
            if layers % (row.pp * row.stages):
                out.append(f"{layers} blocks in {row.pp * row.stages} uneven chunks (Megatron's split) costed as "
                           "even ones")
        else:
            out.append(f"{row.stages} virtual stages run as plain 1F1B")
    microbatches, per_replica = None, row.global_batch // dp
    if row.pp > 1:
        microbatches = max(per_replica // row.micro_batch, 1)
    elif per_replica != row.micro_batch and costs["accumulation"]:
        microbatches = max(per_replica // row.micro_batch, 1)
        if per_replica % row.micro_batch:
            out.append(f"a replica's {per_replica} samples (cp folded into dp) run as {microbatches} accumulated "
                       "micro-batches")
    elif per_replica != row.micro_batch:
        out.append(f"{max(per_replica // row.micro_batch, 1)} accumulated micro-batches of "
                   f"{row.micro_batch} run as one of {per_replica} samples")
    ac = None
    if row.recompute == "selective" and costs["selective"]:
        ac = "op"
        if "torchtitan" not in row.source:
            out.append("the source's selective recompute run as torchtitan's op policy (ac=op)")
    elif row.recompute == "selective":
        out.append("selective recompute run as none")
    dist_opt, sp = training_frameworks.plan_words(row, dp)
    dtype = row.precision
    if row.precision == "fp8" and not costs["fp8"]:
        dtype = "bf16"
        out.append("FP8 run as BF16")
    cp = {"cp": row.cp} if costs["cp"] and row.cp > 1 else {}
    plan = Parallel(dp=dp, tp=row.tp, pp=row.pp, ep=row.ep, fsdp=row.fsdp and dp > 1, microbatches=microbatches,
                    recompute=row.recompute == "full", stages=stages, ac=ac, dist_opt=dist_opt, sp=sp, **cp)
    fusion, overlap, kernels = kernels_of(row)
    return Layout(plan, dtype, seq_len, devices, tuple(out + kernels), fusion, overlap, ranks)


def system_of(row: TrainingRow, devices: int | None = None) -> System:
    """The row's chip x devices (or `devices` of them): scale-up domains of row.domain devices
    over the chip's catalog scale-out (or the row's scaleout_gbps)."""
    devices = devices or row.devices
    links = {"scaleout_gbps": row.scaleout_gbps} if row.scaleout_gbps else {}
    return System(row.chip, devices, domain=min(row.domain, devices), **links)


def per_gpu(row: TrainingRow, step_s: float) -> float:
    """The row's figure for a step of step_s emulated seconds over the row's own batch and
    sequence: tokens/s per GPU, or model TFLOPS per GPU (Relay's count, 6 N T + attention, as
    relay plan's MFU)."""
    tokens = row.global_batch * row.seq_len
    if row.metric == "tflops_per_gpu":
        return analytic.model_flops(config_of(row.workload, row.seq_len), tokens) / step_s / row.devices / 1e12
    return tokens / step_s / row.devices


def cost(row: TrainingRow, lay: Layout):
    """planner.cost of the row at its published layout, with the kernels, overlaps and memory its framework runs."""
    system, kw = system_of(row, lay.devices), dict(dtype=lay.dtype, seq_len=lay.seq_len, fusion=lay.fusion,
                                                   attention=attention_of(row))
    memory = footprint(row.workload, lay.plan, row.global_batch, system.chip.name, **kw, cp=lay.cp,
                       regather=row.framework in training_frameworks.REGATHER)  # (Megatron's SP: activations.py)
    return planner.cost(system, row.workload, lay.plan, row.global_batch, memory, **kw, overlap=lay.overlap,
                        **training_frameworks.planner_kw(row))


def run(row: TrainingRow, best: bool = True) -> dict:
    """Relay's figure for the row at its published layout (and the planner's best plan), in the
    row's unit, or {"not_run": reason}."""
    lay = layout(row)
    extras = tuple(e for e in row.extras if not e.startswith(MODELLED + FUSED_EXTRAS))  # (fused, or said: kernels_of)
    out = {"row": row, "approximations": lay.approximations, "extras": extras}
    system = system_of(row, lay.devices)
    c = config_of(row.workload, lay.seq_len)
    try:  # (uneven virtual chunks, which Parallel.check refuses, are costed as even: see layout)
        uneven = lay.plan.interleaved and c.n_layers % (lay.plan.pp * lay.plan.n_stages)
        (replace(lay.plan, stages=None) if uneven else lay.plan).check(system.devices, system.domain, c,
                                                                         row.global_batch // lay.plan.dp)
    except ConfigError as e:
        return {**out, "not_run": str(e)}
    full = config_of(row.workload, row.seq_len)  # the row's own sequences (a CP row's plan runs one CP rank's)
    if (left := 1 - analytic.model_flops(c, 1) / analytic.model_flops(full, 1)) > TARGET_MEDIAN:
        return {**out, "not_run": f"the nearest plan leaves out {left:.0%} of the row's model FLOPs (attention over "
                                  f"sequences of {lay.seq_len} tokens, not {row.seq_len}): needs a CP dimension"}
    r = cost(row, lay)
    fig = per_gpu(row, r.step_s)
    out.update(plan=lay.plan, relay=fig, ratio=fig / row.published, err=abs(fig / row.published - 1),
               step_s=r.step_s, memory=r.memory)
    if best:  # on the row's own system and sequence (a CP row above ran one CP rank of each group)
        kw = dict(dtype=lay.dtype, seq_len=row.seq_len, fusion=lay.fusion, attention=attention_of(row))
        found = planner.search(system_of(row), row.workload, row.global_batch, top=1, **kw, **dispatch_of(row)[0])
        if found.results:
            out.update(best=per_gpu(row, found.results[0].step_s), best_plan=found.results[0].plan)
    return out


def summary(results: list[dict], bound: float | None = TARGET_WORST) -> dict:
    """The verdict's figures over the rows run and not used for fitting, None where there is none
    (`bound`: the |error| a row misses beyond; None: no bound, as `relay validate --inference`'s)."""
    ran = [x for x in results if "not_run" not in x]
    held = [x for x in ran if not x["row"].fit]
    worst = max(held, key=lambda x: x["err"], default=None)
    return {"rows": len(results), "ran": len(ran), "held_out": len(held),
            "not_run": [x["row"].id for x in results if "not_run" in x],
            "median_abs_err": statistics.median(x["err"] for x in held) if held else None,
            "worst_id": worst["row"].id if worst else "", "worst_abs_err": worst["err"] if worst else None,
            "misses": [x["row"].id for x in held if bound is not None and x["err"] > bound], "worst_bound": bound}


def verdict(s: dict, median: float = TARGET_MEDIAN) -> tuple[bool, str]:
    if not s["held_out"]:  # every row run a fit row, or none ran: a median over no row judges nothing
        return False, f"MISS: no row run that was not used for fitting: nothing to judge ({s['ran']} row(s) run)"
    ok = s["median_abs_err"] <= median and not s["misses"]
    return ok, (("PASS: " if ok else "MISS: ") + f"median |error| {s['median_abs_err']:.1%} over the "
                f"{s['held_out']} row(s) run and not used for fitting (target <= {median:.0%}), worst "
                f"{s['worst_id']} {s['worst_abs_err']:.1%}" + (f", {len(s['misses'])} row(s) beyond "
                f"{s['worst_bound']:.0%} (target none)" if s["worst_bound"] is not None else ""))


def _published_layout(r: TrainingRow) -> str:
    dims = [f"{k}{getattr(r, k)}" for k in ("tp", "pp", "cp", "dp", "ep") if getattr(r, k) > 1]
    dims += ([f"vp{r.stages}"] if r.stages > 1 else []) + (["fsdp"] if r.fsdp else [])
    return (f"{' '.join(dims) or 'dp1'}, GBS {r.global_batch} MBS {r.micro_batch} seq {r.seq_len}, "
            f"{r.precision}, recompute {r.recompute}")


def report(results: list[dict]) -> str:
    table = []
    for i, x in enumerate(results, 1):
        r = x["row"]
        head = [i, r.id, f"{r.devices} x {r.chip}", _published_layout(r), f"{r.published:g}", r.unit]
        if "not_run" in x:
            table.append(head + ["not run", "", "", "", "", "", ""])
            continue
        best = f"{x['best']:.4g}" if "best" in x else "-"
        table.append(head + [str(x["plan"]), f"{x['relay']:.4g}", f"{x['ratio']:.3f}", f"{x['err']:.1%}",
                             best, str(x.get("best_plan", "-")), f"{x['memory'].total / GB:.0f} / "
                             f"{x['memory'].capacity / GB:.0f}" + ("" if x["memory"].fits else " (over)")])
    return tabulate(table, headers=["#", "row", "chips", "published layout", "published", "unit",
                                    "Relay ran (plan)", "Relay\n(emulated,\nrow's unit)", "ratio", "|error|",
                                    "best plan\n(emulated,\nrow's unit)", "best plan",
                                    "peak memory / HBM\n(GB per device,\nRelay's model)"],
                    disable_numparse=True)


def notes(results: list[dict]) -> list[str]:
    """Per row, what Relay approximated (and what it does not model) or why it did not run."""
    out = []
    for i, x in enumerate(results, 1):
        what = list(x["approximations"])
        if "not_run" in x:
            what.insert(0, f"not run: {x['not_run']}")
        elif not x["memory"].fits:
            what.append(f"over the HBM in Relay's memory model ({x['memory'].describe()})")
        what += [f"not modelled: {', '.join(x['extras'])}"] if x["extras"] else []
        if what:
            out.append(f"#   {i} {x['row'].id}: " + "; ".join(what))
    return out


def cmd_training(args) -> int:
    path = args.table or TRAINING
    rows = load(path)
    if args.only:
        rows = [r for r in rows if re.search(args.only, r.id)]
        if not rows:
            raise ConfigError(f"--only = {args.only!r} matches no row id of {path}; give a regular expression "
                              "matching some (e.g. automodel)")
    results = [run(r, best=not args.no_best) for r in rows]
    s = summary(results)
    ok, line = verdict(s)
    if args.update:
        validate.update(path, [x for x in results if "not_run" not in x])
    if args.json:
        keep = ("relay", "ratio", "err", "best", "not_run", "approximations")
        print(json.dumps({"rows": [{"id": x["row"].id, "published": x["row"].published, "unit": x["row"].unit,
                                    "source": x["row"].source, "plan": str(x.get("plan", "")),
                                    "best_plan": str(x.get("best_plan", "")),
                                    **{k: x[k] for k in keep if k in x}} for x in results],
                          "summary": s, "verdict": line}, indent=2))
        return 0 if ok else 1
    print("# relay validate --training: Relay's emulated training throughput (analytic plan model, "
          "relay.analytic.planner) against published end-to-end training runs")
    print(f"# table: {path}; each row at its published layout (nearest plan Relay costs; approximations "
          "below) and, beside it, the planner's best plan on the same system and batch")
    print(report(results))
    print("# approximations, what Relay does not model, and memory (per row):")
    print("\n".join(notes(results)) or "#   none")
    print(f"# {s['rows']} rows, {s['ran']} run, {len(s['not_run'])} not run"
          + (f" ({', '.join(s['not_run'])})" if s["not_run"] else ""))
    if s["misses"]:
        print(f"# beyond {TARGET_WORST:.0%}: {', '.join(s['misses'])} (their approximations above)")
    if args.update:
        print(f"# updated the relay column of {path}")
    if args.programs:  # the rows' own programs launched (slow, opt-in), before the verdict
        from relay.launch import validate_programs
        validate_programs.cmd_programs(rows, results, path)
    print(line)
    return 0 if ok else 1
