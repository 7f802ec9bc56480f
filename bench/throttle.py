"""Throttle fidelity, wall clock: does a throttled device reach the rate the cost model asks for?

4 devices each emulating A100, H100 and Ascend 910C run square matmuls of 256 to 2048 on the
wall clock (dilation chosen automatically so that the host is not oversubscribed). For each chip
and size it prints the achieved emulated TFLOPS (FLOPs / measured emulated time, the measured
time being real time / dilation) against the target (FLOPs / the cost model's time, which is
peak x matmul efficiency once the matmul is large enough to be compute-bound, launch cost
included), and the median |achieved / target - 1| over devices and sizes >= 512. Then one run
with a dilation 10x too small, which must report its overrun.

    python bench/throttle.py        (about 1 minute)
"""

from __future__ import annotations

import statistics
import sys
import time

from tabulate import tabulate

from relay import Cluster, System

SIZES = [256, 512, 1024, 2048]
REPEATS = [16, 4, 2, 1]  # about the same wall time per size
CHIPS = ["a100", "h100", "ascend-910c"]


def main() -> int:
    t_start = time.time()
    rows, worst = [], {}
    with Cluster(System(CHIPS[0], 4), clock="wall") as cluster:
        print(f"# host: {cluster.host.cores} cores, {cluster.host.matmul_gflops_per_core:.0f} GFLOP/s "
              f"per core (fp32 matmul), {cluster.host.mem_gbps:.1f} GB/s copy")
        for chip in CHIPS:
            cluster.configure(System(chip, 4), clock="wall")
            res = cluster.run_matmuls(SIZES, REPEATS)
            errors = []
            for i, n in enumerate(SIZES):
                per = [r["sizes"][i] for r in res]
                achieved = [p["flops"] / p["emulated_s"] for p in per]
                target = per[0]["flops"] / per[0]["modeled_s"]
                err = [abs(a / target - 1) for a in achieved]
                if n >= 512:
                    errors += err
                peak = cluster.system.chip.peak_flops("bf16") * cluster.system.chip.matmul_eff
                rows.append([chip, n, per[0]["repeats"], f"{statistics.median(achieved) / 1e12:.1f}",
                             f"{target / 1e12:.1f}", f"{peak / 1e12:.1f}",
                             f"{100 * statistics.median(err):.2f}", f"{min(r['fidelity'] for r in res):.4f}",
                             f"{res[0]['dilation']:.0f}"])
            worst[chip] = statistics.median(errors)
        print(tabulate(rows, headers=["chip", "n", "matmuls", "achieved emul TFLOPS", "target emul TFLOPS",
                                      "peak x eff TFLOPS", "median |err| %", "fidelity", "dilation"],
                       disable_numparse=True))
        print()
        for chip, e in worst.items():
            verdict = "ok" if e <= 0.03 else "ABOVE 3%"
            print(f"median |achieved/target - 1| at n >= 512, {chip}: {100 * e:.2f}%  ({verdict})")

        # a deliberately too-small dilation must be refused, then (when forced) report its overrun
        cluster.configure(System("h100", 4), clock="wall")
        needed = cluster.run_matmuls([1024])[0]["dilation"]
        small = needed / 10
        cluster.configure(clock="wall", dilation=small)
        try:
            cluster.run_matmuls([1024], repeats=4)
            print("too-small dilation: NOT refused (unexpected)")
        except ValueError as e:
            print(f"\ntoo-small dilation refused before running: {e}")
        cluster.check_dilation = False
        res = cluster.run_matmuls([1024], repeats=4)
        print(f"forced anyway (dilation {small:.0f}, needed {needed:.0f}): overruns "
              f"{sum(r['overruns'] for r in res)}, overrun {max(r['overrun_s'] for r in res) * 1e6:.1f} "
              f"emulated us, fidelity {min(r['fidelity'] for r in res):.3f}, achieved "
              f"{res[0]['flops'] / res[0]['emulated_s'] / 1e12:.1f} of "
              f"{res[0]['flops'] / res[0]['modeled_s'] / 1e12:.1f} emulated TFLOPS")
    print(f"\n# wall time {time.time() - t_start:.0f} s")
    return 0 if all(e <= 0.03 for e in worst.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
