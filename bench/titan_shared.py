"""torchtitan 0.3.0's llama3 (its own configs, unmodified) at full size on 64-256 emulated devices
through a shared launch (`relay launch --tensors fake --shared`: rank 0 runs alone, every device
is replayed from its recording), against torchtitan's published figure for the configuration.
Prints torchtitan's own tps / MFU / memory lines (emulated), Relay's emulated step of every
device, and the host seconds the run took.

    .venv/bin/python bench/titan_shared.py [8b-h100x128 | 8b-h100x64 | 8b-h100x256 | 70b-a100x64] [steps]

Published (emulator/hardware/training.toml rows, with their sources):
- 8b-h100x128: torchtitan-h100x128-llama3-8b, https://github.com/pytorch/torchtitan/blob/b5bcd76c6/
  benchmarks/llama3_h100_202412_torchtitan.md, Table 3 (1D parallelism (FSDP), Llama 3.1 8B, 128
  GPUs), row "FSDP": 5,605 tokens/s per GPU; local batch 2, sequence 8192, selective (op) AC;
  Grand Teton H100 SXM 96 GB HBM2e, 500 W, 8 per host, 400 Gb/s RDMA per GPU.
- 8b-h100x64, 8b-h100x256: the same configuration on 64 and 256 devices (no published row; the
  8- and 128-device rows give 5,762 and 5,605).
- 70b-a100x64: torchtitan-a100x64-llama3-70b, https://github.com/pytorch/torchtitan/blob/4d88a8a44/
  docs/performance.md (FSDP2 on 64 A100 80GB, 70B, batch size 1, full AC): 331 tokens/s per GPU,
  MFU 51.7%; sequence 8192.
What differs from the published runs, stated: torchtitan 0.3.0; FlexAttention (0.3's default;
charged as one fused SDPA kernel); --training.disable_cuda_graphs and --parallelism.spmd_backend
partial_dtensor (README); the test assets' tokenizer and data (fake tensors: shapes matter, not
values); the catalog's chips (h100: the 80 GB, 700 W SXM part).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"step:\s*(\d+).*?memory:\s*([\d.]+)GiB.*?tps: ([\d,]+)\s+tflops: ([\d.,]+)\s+mfu: ([\d.]+)%")
CASES = {  # devices, chip, torchtitan config, its options, published tokens/s/GPU (None: none)
    "8b-h100x128": (128, "h100", "llama3_8b", ["--training.local_batch_size", "2"], 5605),
    "8b-h100x64": (64, "h100", "llama3_8b", ["--training.local_batch_size", "2"], None),
    "8b-h100x256": (256, "h100", "llama3_8b", ["--training.local_batch_size", "2"], None),
    # llama3_70b's own config takes full AC (FullAC.Config()) and tensor_parallel_degree 8: the
    # published row is FSDP alone
    "70b-a100x64": (64, "a100", "llama3_70b", ["--training.local_batch_size", "1",
                                              "--parallelism.tensor_parallel_degree", "1"], 331),
}


def main(case: str = "8b-h100x128", steps: int = 2) -> None:
    devices, chip, config, options, published = CASES[case]
    out = tempfile.mkdtemp(prefix=f"titan-shared-{case}-")
    cmd = [sys.executable, "-m", "relay.launch.cli", "launch", "--chip", chip, "--devices", str(devices),
           "--domain", "8", "--tensors", "fake", "--shared", "--out", out, "--name", "run", "--timeout-s", "3600",
           "-m", "torchtitan.train", "--module", "llama3", "--config", config,
           "--training.disable_cuda_graphs", "--parallelism.spmd_backend", "partial_dtensor",
           "--hf_assets_path", "tests/assets/torchtitan/tokenizer", "--dataloader.dataset", "c4_test",
           "--dataloader.dataset_path", "tests/assets/torchtitan/c4_test", *options,
           "--training.steps", str(steps), "--metrics.log_freq", "1", "--dump_folder", f"{out}/dump"]
    print("$", " ".join(cmd[1:]))
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    host_s = time.perf_counter() - start
    text = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)
    with open(f"{out}/console.log", "w") as fh:
        fh.write(text)
    for line in text.splitlines():
        if ("step:" in line and line.startswith("[rank 0]")) or line.startswith("# relay launch"):
            print(line)
    found = LINE.findall(text)
    if done.returncode or not found:
        print(text[-3000:])
        print(f"run failed (rc {done.returncode}); console: {out}/console.log")
        return
    step, memory, tps, tflops, mfu = found[-1]
    tps = int(tps.replace(",", ""))
    summary = json.loads(open(f"{out}/run/summary.json").read())
    steps_all = summary["steps"]
    print(f"\nllama3 {config}, FSDP over {devices} x {chip} (domains of 8), {' '.join(options)}, shared launch")
    print(f"  torchtitan's own line on Relay (step {step}, emulated): {tps:,} tps/GPU, {tflops} TFLOPS, MFU {mfu}%, "
          f"memory {memory} GiB (emulated HBM)")
    last = steps_all[-1]
    print(f"  Relay's last step over all {devices} devices (emulated): {last['step_s'] * 1e3:.1f} ms, compute "
          f"{last['compute_s'] * 1e3:.1f} ms, exposed comm {last['exposed_comm_s'] * 1e3:.1f} ms (means)")
    if published:
        print(f"  published: {published:,} tps/GPU; relay / published: {tps / published:.3f}")
    else:
        print("  published: none for this device count")
    print(f"  host time of the run: {host_s:.0f} s (real), {steps} steps; results: {out}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else "8b-h100x128", int(args[1]) if len(args) > 1 else 2)
