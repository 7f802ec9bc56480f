"""Collective benchmarks on 4 device actors (h100 links: 450 GB/s, 2.5 us).

(a) Transport efficiency, unthrottled: Relay's ring all-reduce between the actors (virtual
    clock: nothing sleeps) against torch.distributed.all_reduce (gloo's own) on the same actors,
    1, 16 and 64 MB. Ratio of real bus bandwidths, ours / gloo's (medians of 5).
(b) Wall-clock fidelity: on the wall clock, the emulated bus bandwidth measured at large sizes
    against the configured link bandwidth, the measured latency of one small message against
    alpha, and wall against virtual emulated times.

    python bench/collectives.py        (about 1 minute)
"""

from __future__ import annotations

import statistics
import sys
import time

from tabulate import tabulate

from relay import Cluster, System
from relay.collectives import busbw_factor
from relay.device import jobs

MB = 2**20


def main() -> int:
    t_start = time.time()
    missed = []  # every printed target that was missed, for the verdict and the exit status
    with Cluster(System("h100", 4)) as cluster:
        # (a) transport efficiency
        rows = []
        for mb in (1, 16, 64):
            ours, gloo = [], []
            for _ in range(5):
                gloo.append(max(cluster.run(jobs.gloo_all_reduce, mb * MB, 1)))
                ours.append(cluster.collectives("all_reduce", [(mb * MB // 4, "float32")], "ring")[0].real_s)
            f = busbw_factor("all_reduce", 4)
            bw = lambda t: mb * MB / t * f / 1e9  # noqa: E731
            ratio = statistics.median(gloo) / statistics.median(ours)
            if mb >= 16 and ratio < 0.8:
                missed.append(f"(a) ours / gloo = {ratio:.2f} at {mb} MB (target >= 0.8)")
            rows.append([mb, f"{bw(statistics.median(ours)):.3f}", f"{bw(statistics.median(gloo)):.3f}",
                         f"{ratio:.2f}"])
        print("(a) unthrottled all-reduce between 4 actors, real bus bandwidth (host GB/s)")
        print(tabulate(rows, headers=["MB", "Relay ring (real GB/s)", "gloo all_reduce (real GB/s)",
                                      "ours / gloo"], disable_numparse=True))
        print("    target: >= 0.8 at 16 and 64 MB\n")

        # (b) wall-clock fidelity
        link = cluster.system.scaleup_gbps
        rows = []
        for mb in (64, 256):
            case = [(mb * MB // 4, "float32")]
            virtual = cluster.configure(clock="virtual").collectives("all_reduce", case, "ring")[0]
            wall = cluster.configure(clock="wall").collectives("all_reduce", case, "ring")[0]
            busbw = mb * MB / wall.emulated_s * busbw_factor("all_reduce", 4) / 1e9
            model = mb * MB / virtual.emulated_s * busbw_factor("all_reduce", 4) / 1e9
            for what, value in ((f"busbw / link at {mb} MB", busbw / link),
                                (f"wall / virtual at {mb} MB", wall.emulated_s / virtual.emulated_s)):
                if abs(value - 1) > 0.05:
                    missed.append(f"(b) {what} = {value:.3f} (target within 5% of 1)")
            rows.append([f"all_reduce ring {mb} MB", f"{busbw:.1f} GB/s", f"{model:.1f} GB/s",
                         f"{busbw / link:.3f}", f"{wall.emulated_s / virtual.emulated_s:.4f}",
                         f"{wall.fidelity:.4f}"])
        cluster.configure(System("h100", 2))
        case = [(1, "float32")]  # one 4-byte message: the latency alone
        virtual = cluster.configure(clock="virtual").collectives("broadcast", case, "ring")[0]
        wall = cluster.configure(clock="wall").collectives("broadcast", case, "ring", repeats=5)[0]
        alpha = cluster.system.scaleup_latency_us
        rows.append(["one 4-byte message", f"{wall.emulated_s * 1e6:.3f} us", f"{virtual.emulated_s * 1e6:.3f} us",
                     f"{wall.emulated_s * 1e6 / alpha:.3f} (of alpha)", f"{wall.emulated_s / virtual.emulated_s:.4f}",
                     f"{wall.fidelity:.4f}"])
        print(f"(b) wall clock, h100 links ({link:g} GB/s per direction, alpha {alpha:g} us)")
        print(tabulate(rows, headers=["", "measured (wall, emulated)", "model (virtual)",
                                      "measured / link figure", "wall / virtual", "fidelity"],
                       disable_numparse=True))
        print("    targets: busbw within 5% of the link at large sizes; wall within 5% of virtual")
    print(f"\n# wall time {time.time() - t_start:.0f} s")
    print("# verdict: " + ("every target met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
