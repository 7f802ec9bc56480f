"""The plan search (emulator/analytic/planner.py, analytic) against exhaustive fake-tensor runs: on
a small system and the debug configuration, the plan the search ranks first is the plan the runs
(the real model code and plans.py's plans on the emulated fabric) find fastest.

The space run, to keep the test to about a minute of real time: llama-debug on 4 h100 in one
scale-up domain, global batch 16, every plan `planner.plans` yields and the memory check passes
except recompute (it only adds a forward pass: at debug size memory never binds, so a recompute
plan is its plain twin plus that pass) and more than 2 microbatches (more of the same pipeline,
each slower). That leaves data parallel (DDP's buckets and FSDP2), tensor parallel and pipelines
alone and combined: 6 plans. bench/plan_vs_runs.py runs all 26 and prints the comparison."""

from relay import System
from relay.analytic import planner
from relay.launch.plan import run_plans

WORKLOAD, BATCH = "llama-debug", 16


def test_plan_search_returns_the_plan_fake_runs_find_fastest(cluster8):
    system = System("h100", 4)
    cluster8.configure(system, clock="virtual")
    found = planner.search(system, WORKLOAD, BATCH, top=1000, message_bytes=4)  # the runs move fp32
    space = [r for r in found.results if not r.plan.recompute and r.plan.n_microbatches <= 2]
    assert len(space) == 6 and {(r.plan.tp > 1, r.plan.pp > 1, r.plan.fsdp) for r in space} >= {
        (False, False, False), (True, False, False), (False, True, False), (False, False, True)}
    assert found.results[0] is space[0]  # the search's best is in the space run
    runs = run_plans(cluster8, WORKLOAD, [r.plan for r in space], BATCH)
    steps = {str(r.plan): x["step_s"] for r, x in zip(space, runs)}
    assert min(steps, key=steps.get) == str(found.results[0].plan), steps
    assert len(set(steps.values())) == len(steps)  # the plans really differ in emulated time
