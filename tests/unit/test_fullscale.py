"""The full-scale break-even on the analytic plan search (emulator/analytic/fullscale.py), its
batch rule (emulator/analytic/batchrule.py) and its summary (launch/fullscale_summary.py), on
llama3-8b at a small global batch and small systems (a block measurement costs the same at any
model size; at 8 samples of 8K tokens more devices help, as at full scale)."""

from __future__ import annotations

import math

import pytest

from relay.analytic import batchrule, fullscale, planner
from relay.errors import ConfigError
from relay.hardware import chips
from relay.hardware.system import System
from relay.launch.fullscale import _workload, table
from relay.launch.fullscale_summary import summary_md
from relay.results.folder import system_dict

WL, BATCH, MAX = "llama3-8b", 9, 5  # 9 samples: dp = 4 runs 8 under the rule, none at a fixed 9
TOL = batchrule.TOLERANCE  # 12.5%: 8 to 10 samples per step
FAST = System("b200", 1)
SLOW = System("ascend-910c", 8, domain=8)  # scaled to each count


def by_hand(system: System) -> float:
    """Brute force under the stated rule, without batchrule: every global batch within the
    tolerance, every plan the planner costs at it, kept when that batch is the multiple of the
    plan's dp nearest the target (ties: the smaller); the most tokens per second."""
    lo, hi = math.ceil(BATCH * (1 - TOL)), math.floor(BATCH * (1 + TOL))
    out = 0.0
    for b in range(lo, hi + 1):
        for r in planner.search(system, WL, b, top=10 ** 9).results:
            dp = r.plan.dp
            nearest = min((k * dp for k in range(1, 2 * BATCH)), key=lambda x: (abs(x - BATCH), x))
            if b == nearest:
                out = max(out, r.tokens_per_s)
    return out


def test_answer_is_the_brute_force_smallest_count_under_the_batch_rule():
    be = fullscale.breakeven(FAST, SLOW, WL, BATCH, MAX)
    target = by_hand(FAST)
    assert be.fast.tokens_per_s == target
    brute = [n for n in range(1, MAX + 1) if by_hand(SLOW.scaled(n)) >= target]  # every count
    assert brute and be.devices == brute[0] > 1  # not trivial: smaller counts fall short
    assert be.slow.tokens_per_s >= target and be.slow.devices == be.devices
    assert be.below.devices == be.devices - 1 and be.below.tokens_per_s < target
    # each plan trains the multiple of its dp nearest the target, within the tolerance
    for p in be.points:
        if p.best:
            assert abs(p.global_batch - BATCH) <= TOL * BATCH and p.global_batch % p.best.plan.dp == 0


def test_every_count_has_a_plan_near_the_target_batch():
    # on 1,152 samples a fixed batch shuts out dp = 284 (the sawtooth); the rule runs it at
    # 1,136, and every count from 202 to 324 can run dp = count (4 or 5 samples per replica)
    assert batchrule.batch_for(284, 1152, 0.0) is None and batchrule.batch_for(284, 1152) == 1136
    assert batchrule.batch_for(253, 1152, 0.05) is None and batchrule.batch_for(253, 1152) == 1265
    assert batchrule.batch_for(6, 9, 0.5) == 6  # a tie goes to the smaller batch
    for n in range(202, 325):
        assert n in batchrule.batches(n, 1152).get(batchrule.batch_for(n, 1152), ())
        system = System.preset("cloudmatrix384").scaled(n)
        b = batchrule.batch_for(n, 1152)
        assert any(p.dp == n for p in planner.plans(system, "llama3-70b", b)), n
    assert batchrule.batches(7, 8) == {8: {1}, 7: {7}}  # a prime count: dp = 7 trains 7 samples


def test_each_side_at_its_own_precision():
    bf16 = fullscale.breakeven(FAST, SLOW, WL, BATCH, MAX)
    fp8 = fullscale.breakeven(FAST, SLOW, WL, BATCH, MAX, fast_dtype="fp8")
    assert fp8.fast.tokens_per_s > bf16.fast.tokens_per_s  # the B200's FP8 GEMMs
    assert fp8.devices is None or fp8.devices >= bf16.devices
    with pytest.raises(ConfigError, match="precision = 'fp8'.*ascend-910c"):
        fullscale.breakeven(FAST, SLOW, WL, BATCH, MAX, slow_dtype="fp8")  # the 910C has no FP8
    with pytest.raises(ConfigError, match="batch tolerance = 1.5"):
        fullscale.breakeven(FAST, SLOW, WL, BATCH, MAX, tolerance=1.5)


def test_a_faster_slow_chip_needs_no_more_devices():
    base = fullscale.breakeven(FAST, SLOW, WL, BATCH, MAX)
    quick = chips.register(SLOW.chip.replace(name="test-quick-910c", bf16_tflops=2 * SLOW.chip.bf16_tflops,
                                                   mem_eff=0.95))
    faster = fullscale.breakeven(FAST, System(quick.name, 8, domain=8), WL, BATCH, MAX)
    assert faster.devices is not None and faster.devices < base.devices
    # and varying an input through `vary` reaches the planner (a variant chip, a new answer)
    r = next(r for r in fullscale.RANGES if r.parameter == "mem_eff")
    varied = fullscale.vary(SLOW, r, 1.2)
    assert varied.chip.mem_eff == min(SLOW.chip.mem_eff * 1.2, 1.0) and varied.chip.name != SLOW.chip.name
    assert fullscale.vary(SLOW, fullscale.RANGES[2], 0.8).scaleup_gbps == SLOW.scaleup_gbps * 0.8


def test_summary_states_units_and_labels():
    fast, slow = System.preset("nvl72").scaled(1), System.preset("cloudmatrix384").scaled(MAX)
    run = _workload(WL, fast, slow, BATCH, [1], MAX, 1e12, False, TOL, [("bf16", "bf16"), ("fp8", "bf16")])
    s = {"kind": "fullscale", "name": "t", "fast": system_dict(fast), "slow": system_dict(slow),
         "global_batch": BATCH, "batch_tolerance": TOL, "batch_range": [8, 10], "train_tokens": 1e12,
         "max_devices": MAX, "workloads": [run], "host_s": 1.0}
    md = summary_md(s)
    assert "**Every figure is emulated**" in md and "published" in md
    for header in ("tokens/s (emulated)", "break-even 910C (emulated)", "days to train 1e+12 tokens",
                   "J per token, fast / slow (emulated, all-in)", "step (emulated s)",
                   "MFU, full attention (emulated %)", "MFU, causal (emulated %)", "precision, fast / slow",
                   "peak memory / HBM (GB per device, emulated)", "published MFU"):
        assert header in md, header
    # the rule in words, both precisions' rows, each MFU beside the published one in its convention
    assert "Batch rule:" in md and "within +-12.5% (8 to 10 samples)" in md and "compared per token" in md
    assert "| BF16 / BF16 |" in md and "| FP8 / BF16 |" in md and "nvl72 (1 rack, FP8)" in md
    assert "causal attention (published" in md
    assert f"| **{run['breakeven'][0]['devices']}** (" in md  # the answer, in the answer table
    assert "34-54% of the BF16 peak, causal attention" in md and "## What Relay does not model" in md
    assert "points below the range" in md or "points above" in md or "(inside)" in md  # how far, per reference
    printed = table(s)
    assert "(emulated)" in printed and "J per token" in printed


def test_the_ranges_analytic_scaling_agrees_with_searching_again():
    """uncertainty.py rescales the searched plans instead of searching per sample: at the catalog
    figures it gives the search's answer, and with the 910C's GEMM or HBM efficiency at 0.65x it
    gives what a new search on a variant chip gives, count by count (llama3-8b, small systems;
    at this size the GEMMs are launch-bound and only HBM efficiency moves the answer)."""
    from relay.analytic import uncertainty

    be = fullscale.breakeven(FAST, SLOW, WL, BATCH, MAX)
    fast, slow, inputs, _ = uncertainty.prepare(be, SLOW, [fullscale.best(SLOW, WL, BATCH)], WL, MAX)
    central = {i.name: i.central for i in inputs}
    assert uncertainty.breakeven(fast, slow, central) == be.devices
    for name, r in (("slow_gemm", fullscale.RANGES[0]), ("slow_hbm", fullscale.RANGES[1])):
        varied = fullscale.vary(SLOW, r, 0.65)  # (the shares were measured at 0.8: this checks their use)
        again = fullscale.breakeven(FAST, varied, WL, BATCH, MAX)
        assert uncertainty.breakeven(fast, slow, {**central, name: 0.65}) == again.devices >= be.devices, name
        for m in slow:  # each count's tokens/s as the search on the variant chip finds them
            searched = fullscale.best(varied.scaled(m.devices), WL, BATCH).tokens_per_s
            assert m.tokens_per_s(**{name[5:]: 0.65}) == pytest.approx(searched, rel=1e-3), (name, m.devices)


def test_a_chip_without_an_interruption_rate_skips_goodput_and_the_range_and_says_so():
    """The risk sections need each chip's interruption rate (hardware/reliability.toml): a chip
    without one gets the point answer and a note, not an error after every search."""
    from relay.launch import fullscale_risk

    slow = System("ascend-910b", 8, domain=8)  # (no row in reliability.toml)
    be = fullscale.breakeven(FAST, slow, WL, BATCH, MAX)
    out = fullscale_risk.extras(be, slow, WL, BATCH, MAX, [], samples=10)
    assert out == {"not_rated": ["ascend-910b"]}
    md = "\n".join(fullscale_risk.summary_md({"workloads": [{"workload": WL, **out}]}))
    assert "no interruption rate for ascend-910b" in md


def test_best_is_cached_however_its_arguments_are_passed():
    a = fullscale.best(SLOW, WL, BATCH)
    assert fullscale.best(SLOW, WL, BATCH, TOL, "bf16", None) is a
    assert fullscale.best(SLOW, WL, BATCH, tolerance=TOL, dtype="bf16") is a
