"""Full-size models on fake tensors, one device: counted FLOPs against 6NT + attention, saved
activations per block against Korthikanti et al. adapted, the memory breakdown of one unsharded
device, and the emulated step on an H100 (one sample of the model's context, AdamW step included).
Each figure comes from models of 0 and 1 block per kind, scaled by the block count (exact).

    python bench/fullsize.py        (about 1 minute on an idle 2-core host)
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

from tabulate import tabulate

from relay.device.fake.measure import by_layers, memory, step_cost
from relay.hardware.chips import get as get_chip
from relay.workloads import analytic, llama, moe

NAMES = ["llama3-8b", "llama3-70b", "llama3-405b", "mixtral-8x7b", "deepseek-v3"]
FLOP_TOL, MEMORY_TOL = 0.02, 0.10


def main() -> int:
    h100 = get_chip("h100")
    rows, mem_rows, worst = [], [], {"flops": 0.0, "memory": 0.0}
    for name in NAMES:
        family = llama if name.startswith("llama") else moe
        c = family.CONFIGS[name]
        t0 = time.perf_counter()
        step = by_layers(name, lambda wl: step_cost(wl, 1, h100))
        mem = by_layers(name, lambda wl: memory(wl, 1))
        host = time.perf_counter() - t0
        expected = (analytic.llama_flops if family is llama else analytic.moe_flops)(c, c.seq_len)
        err = step["forward_backward_flops"] / expected - 1
        worst["flops"] = max(worst["flops"], abs(err))
        rows.append([name, f"{mem['parameter_count'] / 1e9:.2f}", c.seq_len, f"{step['forward_backward_flops']:.4e}",
                     f"{expected:.4e}", f"{err:+.2e}", f"{step['seconds'] * 1e3:.1f}",
                     f"{step['forward_backward_flops'] / step['forward_backward_s'] / h100.peak_flops('bf16'):.2f}",
                     f"{host:.1f}"])
        block = "-" if c.__class__ is moe.MoEConfig and c.attention == "mla" else None
        if block is None:
            formula = analytic.llama_activations if family is llama else analytic.moe_gqa_activations
            one_block = replace(c, n_layers=1, **({"n_dense_layers": 0} if family is moe else {}))
            no_block = replace(one_block, n_layers=0)
            counted = (memory(family.workload(name, one_block), 1)["activations"]
                       - memory(family.workload(name, no_block), 1)["activations"])
            merr = counted / formula(c, 1) - 1
            worst["memory"] = max(worst["memory"], abs(merr))
            block = f"{counted / 1e9:.4f} / {formula(c, 1) / 1e9:.4f} ({merr:+.1e})"
        gb = lambda b: f"{b / 1e9:.1f}"  # noqa: E731
        mem_rows.append([name, gb(mem["parameters"]), gb(mem["gradients"]), gb(mem["optimizer"]),
                         gb(mem["activations"]), gb(mem["total"]), block])
    print("one device, one sample of the context, H100 bf16 (emulated); host s is real time on this host")
    print(tabulate(rows, headers=["workload", "params (B)", "seq", "counted FLOP (fwd+bwd)", "6NT + attention",
                                  "rel err", "step ms (emulated)", "MFU fwd+bwd", "host s"]))
    print("\nmemory per device, unsharded, no recompute, GB (bf16 weights and grads, fp32 master + AdamW)")
    print(tabulate(mem_rows, headers=["workload", "params", "grads", "optimizer", "activations", "total",
                                      "per block counted / formula, GB (rel err)"]))
    ok = worst["flops"] <= FLOP_TOL and worst["memory"] <= MEMORY_TOL
    print(f"\n{'PASS' if ok else 'FAIL'}: worst FLOP error {worst['flops']:.1e} (target {FLOP_TOL:.0%}), "
          f"worst activation-memory error {worst['memory']:.1e} (target {MEMORY_TOL:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
