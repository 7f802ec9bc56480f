"""The plan search (emulator/analytic/planner.py, analytic) against exhaustive fake-tensor runs: on
a small system and the debug configuration, the plan the search ranks first is the plan the runs
(the real model code and plans.py's plans on the emulated fabric) find fastest.

The space run, to keep the test to about a minute of real time: llama-debug on 4 h100 in one
scale-up domain, global batch 16, every plan `planner.plans` yields and the memory check passes
except recompute (it only adds a forward pass: at debug size memory never binds, so a recompute
plan is its plain twin plus that pass) and more than 2 microbatches (more of the same pipeline,
each slower) and gradient accumulation without a pipeline (more of the same microbatch). That
leaves data parallel (DDP's buckets and FSDP2), tensor parallel and pipelines alone and combined:
6 plans. bench/plan_vs_runs.py runs them all and prints the comparison.

What real trainers do beside them (gradient accumulation without a pipeline, selective
activation checkpointing) is held to the bench's tolerance: each plan's analytic step within
MAX_DEV of its fake-tensor run's."""

import pytest

from relay import Parallel, System
from relay.analytic import planner, skew
from relay.launch.plan import run_plans

WORKLOAD, BATCH = "llama-debug", 16
# the runs move fp32 messages and hold their models in fp32, every float charged at the emulated dtype
AS_RUNS = dict(message_bytes=4, model_dtype="fp32")
MAX_DEV = 0.10  # |analytic / run - 1|, bench/plan_vs_runs.py's target


def test_plan_search_returns_the_plan_fake_runs_find_fastest(cluster8):
    system = System("h100", 4)
    cluster8.configure(system, clock="virtual")
    found = planner.search(system, WORKLOAD, BATCH, top=1000, **AS_RUNS)
    space = [r for r in found.results if r.plan.ac is None and r.plan.n_microbatches <= 2
             and (r.plan.pp > 1 or r.plan.microbatches is None)]
    assert len(space) == 6 and {(r.plan.tp > 1, r.plan.pp > 1, r.plan.fsdp) for r in space} >= {
        (False, False, False), (True, False, False), (False, True, False), (False, False, True)}
    assert found.results[0] is space[0]  # the search's best is in the space run
    runs = run_plans(cluster8, WORKLOAD, [r.plan for r in space], BATCH)
    steps = {str(r.plan): x["step_s"] for r, x in zip(space, runs)}
    assert min(steps, key=steps.get) == str(found.results[0].plan), steps
    assert len(set(steps.values())) == len(steps)  # the plans really differ in emulated time


MOE_PLANS = ("dp=4,ep=4", "dp=4,ep=2,fsdp", "dp=4,ep=4,fsdp", "dp=2,ep=2,tp=2")


def test_moe_plans_cost_what_fake_runs_cost(cluster8):
    """moe-debug's expert path (grouped GEMMs, fused permutation: kernels/moe_ops.py) as the
    planner measures it and as fake-tensor runs of the plans charge it: within 2% (the README's
    bound for moe-debug's plans without a pipeline), each plan's all-to-alls included."""
    system = System("h100", 4)
    cluster8.configure(system, clock="virtual")
    plans = [Parallel.parse(p) for p in MOE_PLANS]
    analytic = [planner.cost(system, "moe-debug", p, BATCH, **AS_RUNS) for p in plans]
    runs = run_plans(cluster8, "moe-debug", plans, BATCH)
    for p, a, x in zip(MOE_PLANS, analytic, runs):
        assert x["step_s"] == pytest.approx(a.step_s, rel=0.02), (p, a.step_s, x["step_s"])


def test_skewed_routing_costs_what_a_fake_run_costs(cluster8):
    """A Zipf router (s = 1.5: the first experts, all on device 0, get most tokens) as the planner
    costs it (analytic/skew.py: the busiest device's expert path and all-to-all) and as a fake run
    with the same routing model charges it: each step within 2%, and the step's growth over
    balanced routing within 25% of the run's (a planner that ignored the routing adds nothing)."""
    system, plan, batch = System("h100", 2), Parallel(dp=2, ep=2), 128  # (two devices: a short test)
    cluster8.configure(system, clock="virtual")
    steps = {}
    for routing in ("balanced", "zipf:1.5"):
        run, = run_plans(cluster8, "moe-debug", [plan], batch, routing=routing)
        steps[routing] = (skew.cost(system, "moe-debug", plan, batch, routing, **AS_RUNS).step_s, run["step_s"])
        assert steps[routing][0] == pytest.approx(steps[routing][1], rel=0.02), (routing, steps)
    (a0, r0), (a1, r1) = steps.values()
    assert r1 > r0 and (a1 - a0) == pytest.approx(r1 - r0, rel=0.25), steps


@pytest.mark.parametrize("workload,texts", [
    ("llama-debug", ["dp=4,microbatches=4", "dp=4,fsdp,microbatches=2", "dp=2,tp=2,microbatches=2", "dp=4,ac=op",
                     "dp=2,tp=2,ac=op", "dp=4,ac=layer:2"]),
    ("moe-debug", ["dp=4,ep=2,microbatches=2", "dp=4,ep=2,ac=op"]),
])
def test_accumulation_and_selective_checkpointing_steps_match_fake_runs(cluster8, workload, texts):
    """m microbatches' forward and backward then one gradient sync (DDP's buckets overlapping the
    last backward only, FSDP2 gathering each microbatch); the op policy's recompute without the
    kept ops, every 2nd block recomputed whole."""
    system = System("h100", 4)
    cluster8.configure(system, clock="virtual")
    plans = [Parallel.parse(t) for t in texts]
    runs = run_plans(cluster8, workload, plans, BATCH)
    for plan, run in zip(plans, runs):
        analytic = planner.cost(system, workload, plan, BATCH, **AS_RUNS)
        assert analytic.step_s == pytest.approx(run["step_s"], rel=MAX_DEV), plan
