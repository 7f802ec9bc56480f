"""Full systems on fake tensors (issue 14): a training step of llama3-70b and of DeepSeek-V3 on a
full CloudMatrix 384 and a full GB200 NVL72, each under a plan from `relay plan` (named below),
as shared runs (one worker per distinct role, every device replayed: driver/shared.py).

Prints, per run: the plan, the emulated step time, tokens/s, MFU (model FLOPs: 6 N T plus
attention, workloads/analytic.py), the step breakdown (compute and the exposed waits, means over
devices), the plan's peak memory per device (analytic/footprint.py) and the real seconds this host
took. Target: each step under 2 minutes of host time.

    .venv/bin/python bench/full_scale.py [--only cloudmatrix384:llama3-70b ...]
"""

from __future__ import annotations

import argparse
import sys
import time

import ray

from relay import Cluster, Parallel, System
from relay.analytic import footprint
from relay.workloads import analytic
from relay.workloads import get as get_workload

# (system, workload, plan, global batch in samples): plans from `relay plan` (its top plan, or
# the best one whose 1F1B microbatches a 2-core host records in time, as noted)
RUNS = [
    ("cloudmatrix384", "llama3-70b", "dp=384,fsdp,recompute", 768),  # relay plan's 1st
    ("nvl72", "llama3-70b", "dp=72,fsdp,recompute", 576),  # relay plan's 3rd (1st: tp=2,pp=2, 32 microbatches)
    ("cloudmatrix384", "deepseek-v3", "dp=384,ep=128,fsdp,recompute", 1152),  # relay plan's 1st
    ("nvl72", "deepseek-v3", "dp=72,ep=8,fsdp,recompute", 72),  # relay plan's 1st
]
CATEGORIES = ("tensor parallel", "pipeline", "expert all-to-all", "data parallel")


def model_flops(workload, tokens: int) -> float:
    return analytic.model_flops(get_workload(workload).config, tokens)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="system:workload pairs to run")
    args = ap.parse_args(argv)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    for system_name, workload, text, batch in RUNS:
        if args.only and f"{system_name}:{workload}" not in args.only:
            continue
        system, plan = System.preset(system_name), Parallel.parse(text)
        t0 = time.time()
        with Cluster(system, tensors="fake", timeout_s=600) as cluster:
            res = cluster.train(workload, parallel=plan, global_batch=batch, steps=1, warmup=0)
        host = time.time() - t0
        step = res.steps[-1]
        per_device = [r[-1] for r in res.per_device]
        by = {k: sum(r["exposed_by"].get(k, 0.0) for r in per_device) / len(per_device) for k in CATEGORIES}
        by["pipeline"] += step["pipeline_wait_s"]
        tokens = batch * get_workload(workload).tokens_per_sample
        mfu = model_flops(workload, tokens) / (step["step_s"] * system.peak("bf16"))  # peak: the system's
        fp = footprint.footprint(workload, plan, batch, system.chip.name)
        rows.append((f"{system_name} ({system.devices} x {system.chip.name})", workload, str(plan), tokens,
                     step["step_s"], tokens / step["step_s"], 100 * mfu, step["compute_s"],
                     *[by[k] for k in CATEGORIES], fp.total / 1e9, fp.capacity / 1e9, host))
        print(f"# {rows[-1][0]} {workload}: done in {host:.0f} real s; {rows[-1]}", file=sys.stderr, flush=True)
    head = ["system", "workload", "plan", "tokens/step", "step (emulated s)", "tokens/s (emulated)",
            "MFU (emulated %)", "compute (em. s)", "exposed TP (em. s)", "pipeline bubble+wait (em. s)",
            "exposed expert a2a (em. s)", "exposed DP (em. s)", "peak mem (GB/device)", "HBM (GB)",
            "host (real s)"]
    print(" | ".join(head))
    for r in rows:
        (sysname, wl, plan, tokens, step_s, tps, mfu, comp, tp, pp, a2a, dp, mem, hbm, host) = r
        print(f"{sysname} | {wl} | {plan} | {tokens:,} | {step_s:.2f} | {tps:,.0f} | {mfu:.1f} | {comp:.2f} | "
              f"{tp:.3f} | {pp:.3f} | {a2a:.3f} | {dp:.3f} | {mem:.1f} | {hbm:.0f} | {host:.0f}")
    slow = [r for r in rows if r[-1] > 120]
    print(f"verdict: {len(rows) - len(slow)} of {len(rows)} full-system steps emulated in under 2 minutes of host time"
          + (f"; over: {', '.join(r[0] + ' ' + r[1] for r in slow)}" if slow else ""))
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
