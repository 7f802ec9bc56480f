"""Why the MoE rows of `relay validate --training` miss: each row's emulated step broken into its
parts, its expert-parallel groups placed on the system (inside a scale-up domain or across), one
MoE block's compute by op class (expert grouped GEMMs, other GEMMs, attention, the dispatch's
permutations, the rest), and a what-if that is NOT the model, a documented behaviour of the
framework that ran the row and that Relay does not cost yet:

  te-fp8        Megatron-Core runs the experts as Transformer Engine's GroupedLinear, which runs
                its GEMMs in FP8 under the FP8 recipes (TE's _GroupedLinear "autograd function
                with FP8 support"); Relay charges grouped GEMMs at BF16 under "fp8"
                (kernels/moe_ops.py: torchao's float8 converter swaps nn.Linear only). Costed
                here as the grouped GEMMs in FP8: operands at 1 byte, the FP8 rate and cap, no casts.

AutoModel's DeepSeek-V3 rows run DeepEP under its FakeBalancedGate: the plan model costs that
(analytic/deepep.py: a copy per domain a token reaches), so their expert all-to-all column is
DeepEP's.

    .venv/bin/python bench/moe_rows.py          (about 15 s: fake-tensor blocks of each row)

Every figure is emulated (the step Relay's plan model gives for the row's published layout).
"""

from __future__ import annotations

import contextlib
import sys

from relay import chips
from relay.analytic import footprint
from relay.device.fake.measure import measure_block
from relay.kernels import cost, moe_ops
from relay.kernels.throttle import Throttle
from relay.launch import validate_training as vt
from relay.launch.training_frameworks import attention_of

MOE = ("deepseek-v3", "mixtral-8x7b")
CLASSES = ("expert grouped GEMMs", "other GEMMs", "attention", "permute / unpermute / swiglu", "the rest")


def op_class(packet) -> str:
    if packet in moe_ops.GROUPED_GEMMS or packet is moe_ops.GROUPED_DW:
        return CLASSES[0]
    if packet in cost._GEMMS:
        return CLASSES[1]
    if packet in cost.ATTENTION_FLOPS:
        return CLASSES[2]
    if packet in moe_ops.FLOPS or getattr(packet, "_qualified_op_name", "").startswith("relay::"):
        return CLASSES[3]
    return CLASSES[4]


def block_by_class(row, lay) -> dict:
    """Emulated seconds of one MoE block (forward + backward of one microbatch, the optimizer
    left out) by op class: the block and the model around it measured, the latter taken away.
    Each op's charge goes to its class (under "fused", a chain of memory-bound ops to the op
    charged when it closes)."""
    plan, c = lay.plan, footprint.config_of(row.workload, lay.seq_len)
    mb = row.global_batch // plan.dp // plan.n_microbatches
    real = Throttle._charge

    def run(n_layers: int) -> dict:
        got = dict.fromkeys(CLASSES, 0.0)

        def charge(self, func, args, kwargs, o):
            before = self.emulated_s
            real(self, func, args, kwargs, o)
            got[op_class(func._overloadpacket)] += self.emulated_s - before

        Throttle._charge = charge
        try:
            wl = footprint._workload(row.workload, footprint.shard(c, 1, plan.ep), 1, n_layers, 0)
            b = measure_block(wl, mb, chips.get(row.chip), lay.dtype, "adamw", lay.fusion, attention_of(row))
        finally:
            Throttle._charge = real
        got["the rest"] -= b.optimizer_s  # the optimizer's kernels are "the rest"
        return got

    block, base = run(1), run(0)
    return {k: block[k] - base[k] for k in CLASSES}


def costed(row):
    """(PlanResult, Layout) of the row at its published layout, as `relay validate --training`."""
    lay = vt.layout(row)
    return vt.cost(row, lay), lay


@contextlib.contextmanager
def te_fp8_experts():
    """The grouped GEMMs under "fp8" as FP8 GEMMs: their operands read at 1 byte, at the FP8 rate and
    under its cap, no casts added (block measurements redone, then dropped)."""
    real = cost.CostModel.low_operands

    def low(self, func, args):
        if func._overloadpacket in moe_ops.GROUPED_GEMMS:  # (rows, weights, counts)
            return [args[0], *args[1]]
        if func._overloadpacket is moe_ops.GROUPED_DW:  # (grad, rows, counts)
            return [args[0], args[1]]
        return real(self, func, args)

    cost.CostModel.low_operands = low
    footprint._measure.cache_clear()
    try:
        yield
    finally:
        cost.CostModel.low_operands = real
        footprint._measure.cache_clear()


def placement(row, lay) -> str:
    plan, domain = lay.plan, row.domain
    ep, outer = plan.group("ep", 0), plan.group("dp_outer", 0)
    nodes = lambda g: len({d // domain for d in g})  # noqa: E731
    return (f"EP {plan.ep} over {nodes(ep)} scale-up domain(s) of {domain}; expert replicas (dp/ep = "
            f"{plan.dp_outer}) over {nodes(outer)}")


def main() -> int:
    rows = [r for r in vt.load() if r.workload in MOE]
    print("# MoE rows of relay validate --training: the step (emulated seconds) at the published layout, by part")
    print(f"# {'row':40s} {'published':>9s} {'Relay':>7s} {'ratio':>6s} | {'compute':>8s} {'bubble+p2p':>10s} "
          f"{'expert a2a':>10s} {'dp sync':>8s} {'tp':>6s}  (s)")
    base = {}
    for row in rows:
        r, lay = costed(row)
        pub = row.global_batch * row.seq_len / row.published / row.devices
        base[row.id] = r.step_s
        b = r.breakdown
        print(f"  {row.id:40s} {pub:9.3f} {r.step_s:7.3f} {pub / r.step_s:6.3f} | {b.compute:8.3f} {b.pipeline:10.3f} "
              f"{b.expert_all_to_all:10.3f} {b.data_parallel:8.3f} {b.tensor_parallel:6.3f}")
        print(f"  {'':40s} {placement(row, lay)}; {lay.plan}")
        parts = block_by_class(row, lay)
        total = sum(parts.values())
        print(f"  {'':40s} one MoE block, fwd + bwd of a microbatch: {total * 1e3:.2f} ms = "
              + ", ".join(f"{k} {v / total:.0%}" for k, v in parts.items()))
    print("# what-if (not the model): ratio Relay / published at the published layout")
    with te_fp8_experts():
        for row in [r for r in rows if r.framework == "megatron-core" and r.precision == "fp8"]:
            r, _ = costed(row)
            pub = row.global_batch * row.seq_len / row.published / row.devices
            print(f"  te-fp8       {row.id:40s} ratio {pub / base[row.id]:.3f} -> {pub / r.step_s:.3f} "
                  f"(expert a2a {r.breakdown.expert_all_to_all:.3f} s, compute {r.breakdown.compute:.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
