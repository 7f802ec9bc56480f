"""`relay validate --training --programs`: the training.toml rows that name the program that
produced them (`program = "torchtitan --module llama3 --config llama3_8b"`) run through that
program itself, unmodified, under `relay launch --tensors fake` at full size, beside the plan
model's figure and the published one.

For each such row this builds torchtitan's own overrides that reproduce the row's layout (local
batch, sequence, activation checkpointing, FSDP / replicate / TP / CP / EP degrees, steps: see
`overrides`; a row run with torch.compile is charged with Relay's fused chains, `relay launch --fusion
fused`), launches it on the row's chip x devices in a subprocess (`relay launch`, an embedded
Ray of its own), and reads torchtitan's own log lines of rank 0: the last step's tps, TFLOPS, MFU
and memory. Under Relay the program's clock is the emulated clock, so those are emulated figures;
the host time the run took is real. The `[[comparison]]` entries of the table launch a row's
program on another chip too: Relay-only lines, with no published figure, never in a median.

A row of more than MAX_DEVICES devices launches as a shared run (`relay launch --shared`,
driver/launch_shared.py: rank 0 recorded alone, every device replayed; with tp > 1 the `--parallel
dp=,tp=` hint names the groups torchtitan's mesh makes). A pipeline-parallel row launches one
actor per device (its pipeline schedule's `step(arg_mbs=...)`, torch 2.14's form, is backported on
the devices: device/backend/gpu_libs.py). Not launched, and said so: a pipeline-parallel row of more
than MAX_DEVICES devices (a shared run's recording answers collectives locally, and torchtitan's
pipeline stages exchange their inputs' metadata with their peers at the first step),
and an FP8 row on a chip without FP8 (torchtitan's float8
converter refuses compute capability < 8.9, as it would on that chip), and a BF16 row whose config
builds the float8 converter (torchtitan's llama3_405b: its command line cannot remove it, and it
would run FP8 GEMMs). An FP8 row names a config
with torchtitan's float8 converter (FLOAT8: torchtitan 0.3.0 sets converters in its model spec,
not on its command line; launch/titan_configs.py has the 8B one); torchao's float8 training then
runs as it ships, its torch._scaled_mm charged at the chip's FP8 peak (kernels/fp8.py), and
torchtitan prints no MFU under float8 ("N/A": it would be against the BF16 peak).

bench/titan_fullsize.py runs the 8B-on-8-H100 row through `job` / `launch` as well.
"""

from __future__ import annotations

import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from tabulate import tabulate

from relay import chips
from relay.errors import ConfigError
from relay.launch.training_frameworks import COMPILED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (cwd of the launch)
ASSETS = "tests/assets/torchtitan"  # tokenizer and data torchtitan's wheel does not ship (its README)
MAX_DEVICES = 8  # device actors one launched program starts on this host (one node of 8); more: --shared
STEPS = 3  # torchtitan's step 1 line includes its set-up; the last step's line is read
TIMEOUT_S = 3600.0  # host seconds one launch may take
PROGRAMS = ("torchtitan",)
# flags every torchtitan run passes (its own options, not patches: docs/torchtitan.md): CUDA graphs,
# which Relay refuses by name, off; 0.3's default spmd backend needs a newer torch than 2.13; the
# tokenizer and data are the test assets (fake tensors: values do not matter, shapes do)
TITAN_FLAGS = ("--training.disable_cuda_graphs", "--parallelism.spmd_backend", "partial_dtensor",
               "--hf_assets_path", f"{ASSETS}/tokenizer", "--dataloader.dataset", "c4_test",
               "--dataloader.dataset_path", f"{ASSETS}/c4_test", "--metrics.log_freq", "1")
AC = {"selective": "activation_checkpoint:selective", "full": "activation_checkpoint:full",
      "none": "activation_checkpoint:none"}  # tyro subcommands: last on the command line
STEP = re.compile(r"^\[rank 0\] .*?step:\s*(\d+)\s.*?memory:\s*([\d.]+)GiB.*?tps: ([\d,]+)\s+tflops: ([\d.,]+)"
                  r"\s+mfu: (?:([\d.]+)%|N/A)", re.M)  # (N/A: torchtitan prints no MFU under float8)
PEAK = re.compile(r"^\[rank 0\] .*Peak FLOPS used for computing MFU: ([\d.e+]+)", re.M)
DEVICE = re.compile(r"^\[rank 0\] .*CUDA capacity: (.+?) with ([\d.]+)GiB memory", re.M)
# torchtitan configs (--module --config) that turn its float8 converter on: what an "fp8" row names
FLOAT8 = {("relay.launch.titan_configs", "llama3_8b_float8"), ("relay.launch.titan_configs", "llama3_70b_float8"),
          ("llama3", "llama3_debugmodel_float8"), ("llama3", "llama3_405b")}


@dataclass(frozen=True)
class Job:
    """One launch of a row's program: on the row's chip, or on a comparison's."""

    row: object  # validate_training.TrainingRow
    chip: str
    published: float | None  # None on a comparison line
    argv: tuple  # relay launch's command line (after `python -m relay.launch.cli`), () when not run
    not_run: str = ""
    approximations: tuple = ()


def _named(words: list) -> tuple:
    """(module, config) a torchtitan command line names ("" where one is missing)."""
    return tuple((words[words.index(f) + 1:] or [""])[0] if f in words else "" for f in ("--module", "--config"))


def program_args(row) -> list[str]:
    """The row's `program` field as torchtitan's --module/--config, or a ConfigError."""
    words = shlex.split(row.program)
    if not words or words[0] not in PROGRAMS or "--module" not in words or "--config" not in words:
        raise ConfigError(f"training.toml: row {row.id!r}: program = {row.program!r} is invalid; give "
                          "'torchtitan --module MODULE --config CONFIG' (torchtitan's config_registry function, "
                          "e.g. llama3 / llama3_8b), the only program --programs launches")
    named = _named(words)
    if row.precision == "fp8" and named not in FLOAT8:
        raise ConfigError(f"training.toml: row {row.id!r}: precision = 'fp8' but program = {row.program!r} runs "
                          "torchtitan in BF16 (its float8 converter is set in the model spec of a config); give a "
                          "config with it: " + ", ".join(f"'--module {m} --config {c}'" for m, c in sorted(FLOAT8)))
    return words[1:]


def overrides(row) -> tuple[list[str], list[str]]:
    """torchtitan's command-line overrides that reproduce the row's layout, and what differs."""
    local = row.global_batch // row.dp  # samples per data-parallel rank per step
    args = ["--training.seq_len", str(row.seq_len), "--training.steps", str(STEPS)]
    if row.pp > 1:  # the local batch runs as micro-batches of the row's size
        args += ["--training.local_batch_size", str(local),
                 "--parallelism.pipeline_parallel_microbatch_size", str(row.micro_batch)]
    else:  # micro-batches of the row's size, accumulated up to the global batch
        args += ["--training.local_batch_size", str(row.micro_batch),
                 "--training.global_batch_size", str(row.global_batch)]
    shard, replicate = (row.dp, 1) if row.fsdp else (1, row.dp)
    args += ["--parallelism.data_parallel_shard_degree", str(shard),
             "--parallelism.data_parallel_replicate_degree", str(replicate),
             "--parallelism.tensor_parallel_degree", str(row.tp), "--parallelism.pipeline_parallel_degree",
             str(row.pp), "--parallelism.context_parallel_degree", str(row.cp),
             "--parallelism.expert_parallel_degree", str(row.ep)]
    out = ["torchtitan 0.3.0 from PyPI, not the published run's version, with its defaults (its attention, "
           "FlexAttention, charged as one fused attention kernel)"]
    if COMPILED in row.extras:
        args.append("--compile.enable")
        out.append("torch.compile runs eager on Relay's devices, its kernels charged as Relay's fused chains "
                   "(relay launch --fusion fused, kernels/fusion.py)")
    else:
        args.append("--compile.no_enable")
    if row.recompute == "selective":
        out.append("selective recompute as torchtitan 0.3.0's per-op policy (SelectiveAC)")
    if row.precision == "fp8":
        out.append("torchao's float8 with torchtitan 0.3.0's recipe, rowwise, and BF16 FSDP all-gathers (the "
                   "published run's tensorwise recipe and float8 all-gather are not in 0.3.0's converter); torchtitan "
                   "prints no MFU under float8")
    return args + [AC[row.recompute]], out  # (the AC subcommand last: tyro takes its own flags after it)


def why_not(row, chip: str | None = None) -> str:
    """Why the row's program is not launched here on `chip` (the row's by default; "" when it is)."""
    if row.pp > 1 and row.devices > MAX_DEVICES:
        return (f"pipeline parallel on {row.devices} devices: more than {MAX_DEVICES} launch as a shared run, whose "
                "recording answers each collective locally, and torchtitan's pipeline stages exchange their inputs' "
                "metadata with their peers at the first step")
    c = chips.get(chip or row.chip)
    if row.precision == "fp8" and c.fp8_tflops is None:
        return (f"{c.name} has no FP8 (catalog fp8_tflops \"none\"): torchtitan's float8 converter refuses compute "
                "capability < 8.9, as it would on that chip")
    if row.precision not in ("bf16", "fp8"):
        return f"precision {row.precision!r}: no torchtitan config of it is launched here (bf16 and fp8 are)"
    if row.precision != "fp8" and _named(shlex.split(row.program)) in FLOAT8:
        return (f"its config ({row.program!r}) builds torchtitan's float8 converter into the model spec, which its "
                f"command line cannot remove: it would run FP8 GEMMs for a {row.precision} row")
    return ""


def command(row, chip: str, out: str, steps: int | None = None) -> list[str]:
    """relay launch's command line for the row's program on `chip` x the row's devices."""
    args, _ = overrides(row)
    if steps:
        args[args.index("--training.steps") + 1] = str(steps)
    system = ["--chip", chip, "--devices", str(row.devices), "--domain", str(min(row.domain, row.devices))]
    system += ["--scaleout-gbps", str(row.scaleout_gbps)] if row.scaleout_gbps else []
    system += ["--fusion", "fused"] if COMPILED in row.extras else []  # what compile fuses, as fused
    if row.devices > MAX_DEVICES:  # one device actor per device is too many here: a shared run
        system += ["--shared"] + (["--parallel", f"dp={row.dp * row.cp},tp={row.tp}"] if row.tp > 1 else [])
    name = f"{row.id}-{chip}"
    return ["launch", *system, "--tensors", "fake", "--out", out, "--name", name, "-m", "torchtitan.train",
            *program_args(row), *TITAN_FLAGS, "--dump_folder", f"{out}/{name}-dump", *args]


def comparisons(path) -> list[tuple[str, str]]:
    """The table's [[comparison]] entries: (row id, chip)."""
    with open(path, "rb") as fh:
        table = tomllib.load(fh)
    ids = {r.get("id") for r in table.get("row", [])}
    for c in table.get("comparison", []):
        if c.get("row") not in ids:
            raise ConfigError(f"{path}: [[comparison]] row = {c.get('row')!r} is no row of the table; give the "
                              "id of a [[row]] (relay validate --training lists them) or drop the comparison")
    return [(c["row"], c["chip"]) for c in table.get("comparison", [])]


def jobs(rows: list, path, out: str) -> list[Job]:
    """Every launch --programs makes for `rows` (those with a program, then their comparisons on
    other chips), or why not; bad input is refused here, before anything starts."""
    by_id = {r.id: r for r in rows}
    extra = comparisons(path)
    for rid, chip in extra:
        chips.get(chip)  # a ConfigError naming the catalog's chips
        if rid in by_id and not by_id[rid].program:
            raise ConfigError(f"{path}: comparison of row {rid!r}: that row has no program; give the row "
                              "program = 'torchtitan --module M --config C' or drop the comparison")
    found = []
    for r, chip, published in [(r, r.chip, r.published) for r in rows if r.program] + \
                              [(by_id[rid], chip, None) for rid, chip in extra if rid in by_id]:
        program_args(r)
        reason = why_not(r, chip)
        argv = () if reason else tuple(command(r, chip, out))
        found.append(Job(r, chip, published, argv, reason, tuple(overrides(r)[1])))
    if any(j.argv for j in found) and not os.path.isdir(os.path.join(ROOT, ASSETS)):
        raise ConfigError(f"--programs: {os.path.join(ROOT, ASSETS)} is not there (torchtitan's tokenizer and data "
                          "for offline runs); run from a checkout of this repository, which has them")
    return found


def parse(text: str) -> dict:
    """torchtitan's own lines of rank 0 in a launch's console: each step's (step, memory GiB, tps,
    TFLOPS, MFU %), the MFU peak it used (FLOP/s) and the device name and memory it saw."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    steps = [(int(s), float(m), int(t.replace(",", "")), float(f.replace(",", "")), float(u) if u else None)
             for s, m, t, f, u in STEP.findall(text)]
    peak, device = PEAK.search(text), DEVICE.search(text)
    return {"steps": steps, "peak_flops": float(peak[1]) if peak else None,
            "device": device[1] if device else None, "capacity_gib": float(device[2]) if device else None}


def launch(argv: list, log: str) -> tuple[dict, float, int]:
    """Runs `relay launch argv` from the checkout; its console goes to `log`. (parsed lines, host
    seconds, exit status)."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "relay.launch.cli", *argv], cwd=ROOT, capture_output=True,
                              timeout=TIMEOUT_S)
        out, err, rc = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:  # (what it had printed comes with it, as bytes)
        out, err, rc = e.stdout, (e.stderr or b"") + f"\n(timed out after {TIMEOUT_S:.0f} s)".encode(), 124
    text = re.sub(r"\x1b\[[0-9;]*m", "", ((out or b"") + (err or b"")).decode("utf-8", "replace"))
    with open(log, "w") as fh:
        fh.write(text)
    return parse(text), time.perf_counter() - start, rc


def run_job(job: Job, out: str) -> dict:
    """Launches one job (unless it is not run) and reads its last step's line."""
    if job.not_run:
        return {"job": job}
    log = os.path.join(out, f"{job.row.id}-{job.chip}.log")
    print(f"# launching {job.row.id} on {job.row.devices} x {job.chip}: relay {shlex.join(job.argv)}", flush=True)
    got, host_s, rc = launch(list(job.argv), log)
    return result(job, got, host_s, rc, log)


def result(job: Job, got: dict, host_s: float, rc: int, log: str) -> dict:
    """A launch's figures: its last step's line (tps, or TFLOPS for a TFLOPS/GPU row, is the figure)."""
    if rc or not got["steps"]:
        return {"job": job, "failed": f"failed (exit {rc}); console: {log}", "host_s": host_s}
    step, memory, tps, tflops, mfu = got["steps"][-1]
    fig = tps if job.row.metric == "tokens_per_gpu" else tflops
    return {"job": job, **got, "step": step, "memory": memory, "tps": tps, "tflops": tflops, "mfu": mfu,
            "figure": fig, "host_s": host_s, "log": log}


def report(done: list[dict], plan: dict) -> str:
    """The launched programs' own figures beside the plan model's (`plan`: row id -> the plan model's
    figure on that chip) and the published one."""
    table = []
    for x in done:
        j = x["job"]
        r = j.row
        head = [r.id, f"{r.devices} x {j.chip}", f"{j.published:g}" if j.published else "none (Relay only)",
                r.unit, _g(plan.get((r.id, j.chip)))]
        if "figure" not in x:
            table.append(head + [f"not run: {j.not_run}" if j.not_run else x["failed"], "", "", "", ""])
            continue
        ratio = f"{x['figure'] / j.published:.3f}" if j.published else "-"
        peak = f" of {x['peak_flops'] / 1e12:,.0f}" if x["peak_flops"] else ""
        mfu = f"{x['mfu']:.2f}%{peak}" if x["mfu"] is not None else "N/A (float8)"
        table.append(head + [f"{_g(x['figure'])} (step {x['step']})", ratio, mfu,
                             f"{x['memory']:.2f}", f"{x['host_s']:.0f}"])
    return tabulate(table, headers=["row", "chips", "published", "unit", "plan model\n(emulated)",
                                    "program's own line\n(emulated, row's unit)", "program /\npublished",
                                    "program's MFU\n(emulated, % of its\npeak TFLOPS)",
                                    "program's memory\n(GiB, emulated HBM,\npeak reserved)", "host\n(real s)"],
                    disable_numparse=True)


def _g(v) -> str:
    return "-" if v is None else f"{v:,.0f}" if v >= 1000 else f"{v:.4g}"


def notes(done: list[dict]) -> list[str]:
    """What differs from the published run (once per row), and an MFU torchtitan took against
    another peak than the chip's (it looks the peak up from the device's name)."""
    out, said = [], set()
    for x in done:
        j = x["job"]
        if j.approximations and not j.not_run and j.row.id not in said:
            said.add(j.row.id)
            out.append(f"#   {j.row.id}: " + "; ".join(j.approximations))
        peak = chips.get(j.chip).bf16_tflops
        if x.get("peak_flops") and x.get("mfu") is not None and abs(x["peak_flops"] / 1e12 / peak - 1) > 0.02:
            out.append(f"#   {j.row.id} on {j.chip}: torchtitan's MFU is against {x['peak_flops'] / 1e12:,.0f} TFLOPS, "
                       f"the peak it looks up for {x['device']!r}; against the catalog's BF16 peak, {peak:g} "
                       f"TFLOPS, it is {x['mfu'] * x['peak_flops'] / 1e12 / peak:.2f}% (emulated)")
    return out


def cmd_programs(rows: list, results: list[dict], path) -> None:
    """--programs: launches the rows' programs (and their comparisons) and prints the table."""
    out = tempfile.mkdtemp(prefix="relay-programs-")
    todo = jobs(rows, path, out)
    if not todo:
        print("# --programs: none of these rows names a program (training.toml's `program` field)")
        return
    from relay.launch import validate_training as vt  # (it calls this module)
    plan = {(x["row"].id, x["row"].chip): x["relay"] for x in results if "relay" in x}
    for j in todo:
        if j.chip != j.row.chip and not j.not_run:  # the plan model at the same layout on the other chip
            x = vt.run(replace(j.row, chip=j.chip), best=False)
            plan[(j.row.id, j.chip)] = x.get("relay")
    print(f"# --programs: each row's program launched unmodified (`relay launch --tensors fake`, {STEPS} steps, "
          f"the row's layout); its own last-step line read from rank 0's console (logs: {out})")
    done = [run_job(j, out) for j in todo]
    print(report(done, plan))
    for line in notes(done):
        print(line)
    held = [abs(x["figure"] / x["job"].published - 1) for x in done if "figure" in x and x["job"].published]
    print(f"# programs: {sum('figure' in x for x in done)} of {len(done)} launched and read; "
          + (f"median |program / published - 1| {statistics.median(held):.1%} over {len(held)} row(s) with a "
             "published figure; " if held else "")
          + "the comparison lines (published: none) are in no median; the verdict below is the plan model's")
