"""torchtitan 0.3.0's llama3 8B (its own `llama3_8b` config, unmodified) at full size on 8 emulated
H100 with `relay launch --tensors fake`, against torchtitan's published figure for that
configuration; prints torchtitan's own tps and MFU lines and the host time the run took.

Published: https://github.com/pytorch/torchtitan/blob/b5bcd76c6/benchmarks/llama3_h100_202412_torchtitan.md
Table 1 (1D parallelism (FSDP), Llama 3.1 8B, 8 GPUs, local batch size 2, selective activation
checkpointing), row "FSDP": 5,762 tokens/s per GPU, 82.4 GiB; "33% to 39% MFU" without Float8
(the text under it). Grand Teton H100 SXM: 96 GB HBM2e, 2.4 TB/s, 500 W (the catalog's h100:
80 GB HBM3, 3.35 TB/s, 700 W). Sequence length 8192 (llama3_8b's).

    .venv/bin/python bench/titan_fullsize.py [steps] [--chip h100|b200|ascend-910c] [--row ID] [--devices N]

`--row` takes another torchtitan row of training.toml (torchtitan-h100x128-llama3-8b,
torchtitan-a100x64-llama3-70b, ...) and `--devices` runs its layout on another count (FSDP rows:
dp = devices, the same local batch; no published figure then). A row of more than 8 devices
launches as a shared run (`relay launch --shared`: rank 0 recorded alone, every device replayed),
and Relay's replayed step of every device is printed beside torchtitan's line.

torchtitan's published figure is for H100 only: on another chip the same run is printed without
one (its MFU is against the peak torchtitan looks up from the chip's name: B200 "(GB200, ...)" ->
GB200's 2.5 PFLOPS; a name it does not know, Ascend 910C, -> A100's 312 TFLOPS, with a warning).

The launch is the one `relay validate --training --programs` makes for training.toml's row
torchtitan-h100x8-llama3-8b (launch/validate_programs.py: torchtitan's own overrides for the row's
layout). What differs from the published run, stated: torchtitan 0.3.0 rather than 9dec370 (Dec
2024); FlexAttention (0.3's default; charged as one fused SDPA kernel) where 2024's used SDPA;
--training.disable_cuda_graphs and --parallelism.spmd_backend partial_dtensor (README); the
tokenizer and data are the test assets (fake tensors: values do not matter, shapes do).
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from relay.launch import validate_programs as vp
from relay.launch import validate_training as vt

ROW = "torchtitan-h100x8-llama3-8b"  # training.toml's row: the layout and the published figure
PUBLISHED_MEMORY_GIB = 82.4  # Table 1, row "FSDP"


# why a figure of torchtitan's is missing from its console (validate_programs.parse gives None then)
NO_MFU = "torchtitan prints no MFU under float8"
NO_PEAK = "no 'Peak FLOPS used for computing MFU' line in its console"
NO_DEVICE = "no 'CUDA capacity' line in its console"


def _mfu(mfu: float | None) -> str:
    return f"{mfu:.2f}%" if mfu is not None else f"n/a ({NO_MFU})"


def step_line(step: int, memory: float, tps: int, tflops: float, mfu: float | None) -> str:
    """One step of torchtitan's (validate_programs.parse's tuple), as this script prints it."""
    return (f"[rank 0] torchtitan step {step}: memory {memory:.2f} GiB, tps {tps:,}, tflops {tflops:,.2f}, "
            f"mfu {_mfu(mfu)} (its own line, emulated)")


def own_line(got: dict) -> str:
    """torchtitan's last step with the MFU peak and device it named (validate_programs.parse's dict)."""
    step, memory, tps, tflops, mfu = got["steps"][-1]
    peak = f"{got['peak_flops'] / 1e12:.0f} TFLOPS" if got["peak_flops"] is not None else f"n/a ({NO_PEAK})"
    device = repr(got["device"]) if got["device"] is not None else f"n/a ({NO_DEVICE})"
    return (f"  torchtitan's own line on Relay (step {step}, emulated): {tps:,} tps/GPU, {tflops:,.2f} TFLOPS, "
            f"MFU {_mfu(mfu)}, its peak {peak} for device {device}, memory {memory:.2f} GiB (emulated HBM)")


def main(steps: int = 3, chip: str | None = None, row_id: str = ROW, devices: int | None = None) -> None:
    row = {r.id: r for r in vt.load()}[row_id]
    published = row.published if devices in (None, row.devices) else None
    if devices and devices != row.devices:  # the row's layout on another count: FSDP only, the same local batch
        if row.tp * row.pp * row.cp != 1:
            raise SystemExit(f"--devices: row {row_id} is not FSDP alone (tp, pp, cp = 1); give --row of one that is")
        row = replace(row, devices=devices, dp=devices, global_batch=row.global_batch // row.dp * devices)
    chip = chip or row.chip  # the row's own (h100-hbm2e, the Grand Teton H100 the benchmark ran on)
    out = tempfile.mkdtemp(prefix="titan-")
    argv = vp.command(row, chip, out, steps)  # the launch `relay validate --training --programs` makes
    print("$ relay", shlex.join(argv))
    got, host_s, rc = vp.launch(argv, f"{out}/console.log")
    for line in got["steps"]:
        print(step_line(*line))
    if rc or not got["steps"]:
        print(f"run failed (rc {rc}); console: {out}/console.log")
        return
    step, memory, tps, tflops, mfu = got["steps"][-1]
    print(f"\n{row.model} on {row.devices} x {chip}: tp {row.tp}, dp {row.dp} (fsdp {row.fsdp}), local batch "
          f"{row.global_batch // row.dp}, seq {row.seq_len}, recompute {row.recompute}")
    print(own_line(got))
    summary = Path(out) / f"{row.id}-{chip}" / "summary.json"
    if summary.exists():  # Relay's own figures of the launch: the last step over every device
        last = json.loads(summary.read_text())["steps"][-1]
        print(f"  Relay's last step over all {row.devices} devices (emulated): {last['step_s'] * 1e3:.1f} ms, "
              f"compute {last['compute_s'] * 1e3:.1f} ms, exposed comm {last['exposed_comm_s'] * 1e3:.1f} ms (means)")
    if published and chip == row.chip:
        memory_note = f", {PUBLISHED_MEMORY_GIB} GiB" if row_id == ROW else ""
        print(f"  published ({row.source.split(' (')[0]}): {published:,.0f} tps/GPU{memory_note}")
        print(f"  relay / published: {tps / published:.3f}")
    else:
        print("  published: none for this chip and count")
    print(f"  host time of the run: {host_s:.0f} s (real), {steps} steps; results: {out}")


if __name__ == "__main__":
    args = sys.argv[1:]
    opts = {}
    for flag in ("--chip", "--row", "--devices"):
        if flag in args:
            i = args.index(flag)
            opts[flag] = args[i + 1]
            del args[i:i + 2]
    main(int(args[0]) if args else 3, opts.get("--chip"), opts.get("--row", ROW),
         int(opts["--devices"]) if "--devices" in opts else None)
