"""torchtitan 0.3.0 (PyPI, unmodified) on Relay's virtual CUDA devices against plain torchrun on this
CPU host (bench/titan_reference.py, its stated harness patch): the llama3 debug model on real
tensors under FSDP, FSDP x TP and pipeline schedules (1F1B, and Interleaved1F1B with two stages per
rank), and its DeepSeek-V3 debug model under FSDP x EP (experts over 2 devices); prints each step's
loss and grad norm as torchtitan itself prints them (5 and 4 decimals) on both sides, and Relay's emulated tps and MFU.

    .venv/bin/python bench/titan_runs.py [fsdp tp pp interleaved deepseek]

Flags every run passes (torchtitan's own options, not patches): --training.disable_cuda_graphs
(torchtitan 0.3 captures CUDA graphs by default; Relay refuses them by name), and
--parallelism.spmd_backend partial_dtensor (0.3's default spmd_types backend needs a newer torch
than 2.13: FSDP2 rejects its plain parameters, "all parameters must be DTensors"). torchtitan 0.3.0
runs its pipeline as schedule.step(arg_mbs=...), torch 2.14's form, which both sides backport onto
torch 2.13 (relay.device.backend.gpu_libs, applied by the reference too); under torch 2.14.1 itself,
plain torchrun prints the same losses and grad norms (docs/torchtitan.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
LLAMA = ["--module", "llama3", "--config", "llama3_debugmodel"]
COMMON = ["--training.disable_cuda_graphs",
          "--parallelism.spmd_backend", "partial_dtensor",
          "--hf_assets_path", "tests/assets/torchtitan/tokenizer",
          "--dataloader.dataset_path", "tests/assets/torchtitan/c4_test",
          "--training.steps", "4", "--training.seq_len", "256", "--training.local_batch_size", "2",
          "--debug.seed", "0"]
PP = ["--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "4"]
RUNS = {
    "fsdp": (2, LLAMA),
    "tp": (4, [*LLAMA, "--parallelism.tensor_parallel_degree", "2"]),
    "pp": (2, [*LLAMA, *PP, "--parallelism.pipeline_parallel_schedule", "1F1B",
               "--parallelism.pipeline_parallel_microbatch_size", "2"]),
    "interleaved": (2, [*LLAMA, *PP, "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
                        "--parallelism.pipeline_parallel_layers_per_stage", "2",
                        "--parallelism.pipeline_parallel_microbatch_size", "1"]),
    "deepseek": (2, ["--module", "deepseek_v3", "--config", "deepseek_v3_debugmodel",
                     "--parallelism.expert_parallel_degree", "2"]),
}
STEP = re.compile(r"step:\s*(\d+)\s+loss:\s*([-\d.]+)\s+grad_norm:\s*([-\d.]+).*?tps: ([\d,]+).*?mfu: ([\d.]+%)")


def steps(text: str) -> dict:
    """Each step's line; under a pipeline, the last stage's rank (the others print loss -1)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    out = {}
    for m in STEP.finditer(text):
        if int(m[1]) not in out or out[int(m[1])][0] == "-1.00000":
            out[int(m[1])] = m.groups()[1:]
    return out


def run(cmd: list, out: str) -> tuple[dict, float]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    with open(out, "w") as f:
        f.write(done.stdout + done.stderr)
    return steps(done.stdout + done.stderr), time.perf_counter() - start


def main(names: list) -> None:
    tmp = tempfile.mkdtemp(prefix="titan-runs-")
    for name in names:
        n, extra = RUNS[name]
        args = COMMON + extra
        ref, ref_s = run([os.path.join(os.path.dirname(PY), "torchrun"), "--nproc-per-node", str(n),
                          "--master-port", "29731", "bench/titan_reference.py", *args,
                          "--dump_folder", f"{tmp}/ref-{name}"], f"{tmp}/ref-{name}.log")
        rel, rel_s = run([PY, "-m", "relay.launch.cli", "launch", "--chip", "h100", "--devices", str(n),
                          "--out", f"{tmp}/relay-{name}", "--ranks", "all", "-m", "torchtitan.train", *args,
                          "--dump_folder", f"{tmp}/rel-{name}"], f"{tmp}/relay-{name}.log")
        print(f"# {name}: {n} devices, torchtitan {' '.join(extra)}"
              f"  [host s: torchrun {ref_s:.0f}, relay {rel_s:.0f}; logs {tmp}]")
        print("step  loss torchrun  loss relay  grad_norm torchrun  grad_norm relay  equal  "
              "relay tps (emulated)  relay mfu")
        for step in sorted(set(ref) | set(rel)):
            a, b = ref.get(step, ("-",) * 4), rel.get(step, ("-",) * 4)
            same = a[:2] == b[:2]
            print(f"{step:<5} {a[0]:>13} {b[0]:>11} {a[1]:>18} {b[1]:>16}  {'yes' if same else 'NO':>5}  "
                  f"{b[2]:>20}  {b[3]:>9}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(RUNS))
