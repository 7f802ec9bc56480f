"""Relay's memory model (emulator/analytic/footprint.py) against published peak memory of training
runs that ran: the figure the source printed beside the throughput, and Relay's most loaded device
for the same layout. Relay counts what the run holds by construction (parameters, gradients,
optimizer state, activations saved for backward); a published figure is the allocator's peak
(torchtitan logs torch.cuda.max_memory_reserved, GiB), which adds the caching allocator's
fragmentation and transient buffers (the fp32 logits of the loss, FSDP's prefetched gathers and
reduce-scatter buffers, NCCL's), so Relay's figure should lie below it, and a published layout
should fit its chip.

Sources (each row names its table):
  T = https://github.com/pytorch/torchtitan/blob/b5bcd76c6/benchmarks/llama3_h100_202412_torchtitan.md
      (Grand Teton H100: 96 GB HBM2e, 2.4 TB/s, 500 W: the catalog's h100-hbm2e; torch 2024-12-23)
  P = https://github.com/pytorch/torchtitan/blob/4d88a8a44/docs/performance.md (Llama 3.1 405B on
      128 of the same H100; no memory figure, so only "fits" is checked)
  L = https://arxiv.org/abs/2407.21783 (Llama 3, section 3.3.2 and Table 4: 405B on 80 GB H100
      "without activation checkpointing" at 8K; no memory figure, so only "fits" is checked)

    .venv/bin/python bench/memory_vs_published.py
"""

from __future__ import annotations

import sys

from relay.analytic.footprint import GB, footprint
from relay.parallel import Parallel

GIB = 2 ** 30
# (source and table, workload, chip, plan, global batch, dtype, published peak GiB or None: only "fits")
CASES = [
    ("T Table 1 'FSDP' (8B, 8 GPUs, local batch 2, SAC op)", "llama3-8b", "h100-hbm2e", "dp=8,fsdp,ac=op", 16,
     "bf16", 82.4),
    ("T Table 3 'FSDP' (8B, 128 GPUs, local batch 2, SAC op)", "llama3-8b", "h100-hbm2e", "dp=128,fsdp,ac=op", 256,
     "bf16", 67.0),
    ("T Table 4 '2D' (70B, FSDP 32 TP 8, local batch 16, full AC, compile + Float8)", "llama3-70b", "h100-hbm2e",
     "dp=32,tp=8,fsdp,recompute,sp", 512, "fp8", 71.9),
    ("T Table 5 '1F1B' (405B, FSDP 8 TP 8 PP 8, local batch 32, full AC, compile + Float8)", "llama3-405b",
     "h100-hbm2e", "dp=8,tp=8,pp=8,microbatches=32,fsdp,recompute,sp", 256, "fp8", 82.5),
    ("P '405B, batch size 2, full AC' (FSDP 16 TP 8, local batch 2)", "llama3-405b", "h100-hbm2e",
     "dp=16,tp=8,fsdp,recompute,sp", 32, "bf16", None),
    ("L Table 4, 8,192 GPUs (405B, TP 8 PP 16 V 8 DP 64, 32 micro-batches, no AC)", "llama3-405b", "h100",
     "dp=64,tp=8,pp=16,stages=8,microbatches=32,fsdp,sp", 2048, "bf16", None),
]


def main() -> int:
    print(f"{'published run':<92} {'published':>14} {'Relay':>14} {'Relay / published':>18}  fits")
    print(f"{'':<92} {'(GB, host)':>14} {'(GB, emulated)':>14} {'':>18}")
    below, fits = 0, 0
    for name, workload, chip, plan, batch, dtype, gib in CASES:
        fp = footprint(workload, Parallel.parse(plan), batch, chip, dtype=dtype)
        pub = gib * GIB / GB if gib else None
        ratio = f"{fp.total / GB / pub:.3f}" if pub else "-"
        print(f"{name:<92} {f'{pub:.1f}' if pub else '-':>14} {fp.total / GB:>14.1f} {ratio:>18}  "
              f"{'yes' if fp.fits else 'NO'} ({fp.capacity / GB:.0f} GB)")
        if not fp.fits:
            print(f"    {fp.describe()}")
        below += pub is None or fp.total / GB <= pub
        fits += fp.fits
    n = len(CASES)
    print(f"# {fits} of {n} published layouts fit their chip in Relay's model; {below} of {n} at or below the "
          "published peak (the allocator's, which adds what Relay leaves out)")
    ok = fits == n and below == n
    print(f"verdict: {'PASS' if ok else 'MISS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
