"""What one slow member costs: gpt-tiny on 8 h100 (virtual clock, so the figures are exact), ring
against tree, with one device's compute 2x slower, or its links 8x slower, and an 8-device
system that mixes Ascend 910C and H100.

    python bench/stragglers.py        (about 1 minute)
"""

from __future__ import annotations

import sys
import time

from tabulate import tabulate

from relay import Cluster, Faults, System

KW = dict(steps=3, per_device_batch=8, batch_scale=64, bucket_mb=0.05)
CASES = [("none", Faults()), ("device 3 compute x2", Faults(compute_slowdown={3: 2.0})),
         ("device 3 links x8", Faults(link_slowdown={3: 8.0}))]


def main() -> int:
    t0 = time.time()
    rows = []
    with Cluster(System("h100", 8, scaleup_gbps=50)) as cluster:
        for algorithm in ("ring", "tree"):
            base = None
            for name, faults in CASES:
                cluster.configure(faults=faults)
                s = cluster.train("gpt-tiny", algorithm=algorithm, **KW).summary()
                base = base or s
                rows.append([algorithm, name, f"{s['step_s'] * 1e3:.3f}", f"{s['compute_s'] * 1e3:.3f}",
                             f"{s['comm_s'] * 1e3:.3f}", f"{s['exposed_comm_s'] * 1e3:.3f}",
                             f"{s['step_s'] / base['step_s']:.3f}"])
        cluster.configure(System.mixed([("910c", 6), ("h100", 2)], scaleup_gbps=50), faults=Faults())
        for algorithm in ("ring", "tree"):
            s = cluster.train("gpt-tiny", algorithm=algorithm, **KW).summary()
            rows.append([algorithm, "mixed: 6 x 910c + 2 x h100", f"{s['step_s'] * 1e3:.3f}",
                         f"{s['compute_s'] * 1e3:.3f}", f"{s['comm_s'] * 1e3:.3f}",
                         f"{s['exposed_comm_s'] * 1e3:.3f}", "-"])
    print("gpt-tiny, 8 devices, 50 GB/s links, 50 kB buckets, batch_scale 64 (emulated ms, means over devices)")
    print(tabulate(rows, headers=["algorithm", "slow member", "emul step", "emul compute", "emul comm",
                                  "emul exposed comm", "step / no straggler"], disable_numparse=True))
    print(f"\n# wall time {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
