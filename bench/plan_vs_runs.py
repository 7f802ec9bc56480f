"""The plan search's analytic step (emulator/analytic/planner.py) against fake-tensor runs of every
plan it costs, on a small system: the runs are the ground truth (the real model code and
plans.py's plans on the emulated fabric), the analytic model what `relay plan` ranks by.

Every plan that fits, trained 2 steps on fake tensors (one device actor per device), the second
step's emulated time compared with the analytic one, both at fp32 messages and the model held in
fp32 (the runs move fp32 parameters and gradients and charge every float at the emulated dtype;
planner.search(message_bytes=4, model_dtype="fp32")). Prints per plan both steps, their
ratio and both ranks, then the largest deviation. Targets: the analytic top plan is the runs'
fastest, and every plan's analytic step within MAX_DEV of its run's.

    python bench/plan_vs_runs.py                         (llama-debug on 4 h100: about 2-4 minutes)
    python bench/plan_vs_runs.py --workload moe-debug --max-microbatches 1    (no pipelines)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from tabulate import tabulate

from relay import Cluster, System
from relay.analytic import planner
from relay.launch.plan import run_plans

MAX_DEV = 0.10  # |analytic / run - 1| at most, every plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="llama-debug")
    p.add_argument("--chip", default="h100")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--domain", type=int, default=None, help="devices per scale-up domain (default: all)")
    p.add_argument("--global-batch", type=int, default=16, help="samples per step")
    p.add_argument("--max-microbatches", type=int, help="only plans of at most this many microbatches (1: no "
                   "pipeline), to bound the time (moe-debug's 52 plans take over 20 minutes on a busy host)")
    args = p.parse_args(argv)
    system = System(args.chip, args.devices, domain=args.domain or args.devices)
    found = planner.search(system, args.workload, args.global_batch, top=10_000, message_bytes=4, model_dtype="fp32")
    if args.max_microbatches:
        found.results[:] = [r for r in found.results if r.plan.n_microbatches <= args.max_microbatches]
    print(f"# {args.workload} on {system.describe()}, global batch {args.global_batch}: {len(found.results)} plans "
          f"fit ({found.considered} considered; analytic search {found.host_s:.1f} real s). Host timings are "
          "noisy (a shared 2-core host); the emulated ones are not.")
    start = time.perf_counter()
    with Cluster(system, tensors="fake") as cluster:
        runs = run_plans(cluster, args.workload, [r.plan for r in found.results], args.global_batch)
    order = sorted(range(len(runs)), key=lambda i: runs[i]["step_s"])
    rank = {i: k + 1 for k, i in enumerate(order)}
    rows, devs = [], []
    for i, (r, x) in enumerate(zip(found.results, runs)):
        ratio = r.step_s / x["step_s"]
        devs.append(abs(ratio - 1))
        rows.append([i + 1, rank[i], str(r.plan), f"{r.step_s * 1e3:.3f}", f"{x['step_s'] * 1e3:.3f}", f"{ratio:.3f}",
                     f"{r.breakdown.compute * 1e3:.3f}", f"{x['compute_s'] * 1e3:.3f}",
                     f"{(r.step_s - r.breakdown.compute) * 1e3:.3f}", f"{(x['step_s'] - x['compute_s']) * 1e3:.3f}",
                     f"{x['host_s']:.1f}"])
    print(tabulate(rows, headers=["analytic\nrank", "run\nrank", "plan", "analytic step\n(emulated ms)",
                                  "run step\n(emulated ms)", "analytic\n/ run", "analytic compute\n(emulated ms)",
                                  "run compute\n(emulated ms)", "analytic rest\n(emulated ms)",
                                  "run rest\n(emulated ms)", "run host\n(real s)"], disable_numparse=True))
    top_ok = order[0] == 0
    worst = max(range(len(devs)), key=devs.__getitem__)
    print(f"# runs took {time.perf_counter() - start:.0f} real s. |analytic / run - 1|: median "
          f"{statistics.median(devs):.1%}, max {devs[worst]:.1%} ({found.results[worst].plan}); target max "
          f"{MAX_DEV:.0%}. Analytic top plan {found.results[0].plan}, runs' fastest {found.results[order[0]].plan}.")
    ok = top_ok and devs[worst] <= MAX_DEV
    print(f"verdict: {'PASS' if ok else 'FAIL'}: the analytic top plan is {'' if top_ok else 'NOT '}the runs' fastest, "
          f"and every plan is within {devs[worst]:.1%} of its run (target {MAX_DEV:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
