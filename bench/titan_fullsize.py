"""torchtitan 0.3.0's llama3 8B (its own `llama3_8b` config, unmodified) at full size on 8 emulated
H100 with `relay launch --tensors fake`, against torchtitan's published figure for that
configuration; prints torchtitan's own tps and MFU lines and the host time the run took.

Published: https://github.com/pytorch/torchtitan/blob/b5bcd76c6/benchmarks/llama3_h100_202412_torchtitan.md
Table 1 (1D parallelism (FSDP), Llama 3.1 8B, 8 GPUs, local batch size 2, selective activation
checkpointing), row "FSDP": 5,762 tokens/s per GPU, 82.4 GiB; "33% to 39% MFU" without Float8
(the text under it). Grand Teton H100 SXM: 96 GB HBM2e, 2.4 TB/s, 500 W (the catalog's h100:
80 GB HBM3, 3.35 TB/s, 700 W). Sequence length 8192 (llama3_8b's).

    .venv/bin/python bench/titan_fullsize.py [steps] [--chip h100|b200|ascend-910c]

torchtitan's published figure is for H100 only: on another chip the same run is printed without
one (its MFU is against the peak torchtitan looks up from the chip's name: B200 "(GB200, ...)" ->
GB200's 2.5 PFLOPS; a name it does not know, Ascend 910C, -> A100's 312 TFLOPS, with a warning).

What differs from the published run, stated: torchtitan 0.3.0 rather than 9dec370 (Dec 2024);
FlexAttention (0.3's default; charged as one fused SDPA kernel) where 2024's used SDPA;
--training.disable_cuda_graphs and --parallelism.spmd_backend partial_dtensor (README); the
tokenizer and data are the test assets (fake tensors: values do not matter, shapes do).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED_TPS = 5762  # tokens/s per GPU, Table 1 row "FSDP"
LINE = re.compile(r"step:\s*(\d+).*?memory:\s*([\d.]+)GiB.*?tps: ([\d,]+)\s+tflops: ([\d.,]+)\s+mfu: ([\d.]+)%")


def main(steps: int = 3, chip: str = "h100") -> None:
    out = tempfile.mkdtemp(prefix="titan-8b-")
    cmd = [sys.executable, "-m", "relay.launch.cli", "launch", "--chip", chip, "--devices", "8", "--tensors", "fake",
           "--out", out, "-m", "torchtitan.train", "--module", "llama3", "--config", "llama3_8b",
           "--training.disable_cuda_graphs", "--parallelism.spmd_backend", "partial_dtensor",
           "--hf_assets_path", "tests/assets/torchtitan/tokenizer", "--dataloader.dataset", "c4_test",
           "--dataloader.dataset_path", "tests/assets/torchtitan/c4_test", "--training.local_batch_size", "2",
           "--training.steps", str(steps), "--metrics.log_freq", "1", "--dump_folder", f"{out}/dump"]
    print("$", " ".join(cmd[1:]))
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    host_s = time.perf_counter() - start
    text = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)
    with open(f"{out}/console.log", "w") as fh:
        fh.write(text)
    for line in text.splitlines():
        if "step:" in line and line.startswith("[rank 0]"):
            print(line)
    found = LINE.findall(text)
    if done.returncode or not found:
        print(f"run failed (rc {done.returncode}); console: {out}/console.log")
        return
    step, memory, tps, tflops, mfu = found[-1]
    tps = int(tps.replace(",", ""))
    print(f"\nllama3 8B, FSDP over 8 x {chip}, local batch 2, seq 8192, selective AC")
    print(f"  torchtitan's own line on Relay (step {step}, emulated): {tps:,} tps/GPU, {tflops} TFLOPS, MFU {mfu}%, "
          f"memory {memory} GiB (emulated HBM)")
    if chip == "h100":
        print(f"  published (torchtitan Table 1, FSDP):          {PUBLISHED_TPS:,} tps/GPU (MFU 33-39%), 82.4 GiB")
        print(f"  relay / published: {tps / PUBLISHED_TPS:.3f}")
    else:
        print("  published: none for this chip (torchtitan's Table 1 is H100)")
    print(f"  host time of the run: {host_s:.0f} s (real), {steps} steps; results: {out}")


if __name__ == "__main__":
    args = sys.argv[1:]
    chip = args.pop(args.index("--chip") + 1) if "--chip" in args else "h100"
    args = [a for a in args if a != "--chip"]
    main(int(args[0]) if args else 3, chip)
