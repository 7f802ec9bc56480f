"""DeepEP's normal kernels in the plan model (analytic/deepep.py, planner.cost(dispatch="deepep")),
and a step of several pipeline schedules (planner.cost(schedules=...): AutoModel's gradient
accumulation over a pipeline), by hand and on AutoModel's DeepSeek-V3 rows (analytic, no Ray)."""

import dataclasses

import pytest

from relay import System
from relay.analytic import deepep, planner, skew
from relay.analytic.footprint import config_of, stage_layers
from relay.errors import ConfigError
from relay.launch import training_frameworks
from relay.launch import validate_training as vt
from relay.parallel import Parallel

BY_ID = {r.id: r for r in vt.load()}
N = 4096 * 7168 * 2  # one rank's microbatch of DeepSeek-V3 tokens in bf16, bytes


def test_a_token_reaches_one_domain_and_two_ranks_under_automodels_gate_and_more_under_uniform_routing():
    # FakeBalancedGate: token i to experts 8i .. 8i+7 of 256; EP 64 over 8 nodes: 4 experts a rank, 32 a node
    assert deepep.reach(8, 256, 8, 8, "grouped") == (1, 2)
    assert deepep.reach(8, 256, 8, 1, "grouped") == (1, 1)  # EP 8: 32 experts a rank
    domains, ranks = deepep.reach(8, 256, 8, 8, "uniform")
    assert domains == pytest.approx(8 * (1 - (7 / 8) ** 8)) and ranks == pytest.approx(64 * (1 - (63 / 64) ** 8))
    with pytest.raises(ConfigError, match="routing = 'skewed' is not a DeepEP routing; choose one of grouped, uniform"):
        deepep.reach(8, 256, 8, 8, "skewed")


def test_one_dispatch_is_the_slower_of_its_rdma_and_nvlink_legs_by_hand():
    system = System("h100", 64, domain=8)
    group, fabric = planner._group(system, 64, 1, 1, 64, "ep")
    assert (group.domain, group.domains) == (8, 8)
    up, out = fabric.link(0, 0)[1], fabric.link(0, 8)[1]
    rdma = out.latency_s + out.wire_s(N * 1 * 7 / 8)  # one copy a token, to the 7 other nodes of 8
    nvlink = up.latency_s + up.wire_s(N * 2 * 7 / 8)  # then to its 2 ranks there
    got = deepep.seconds(N, 8, 256, group, fabric, "grouped")
    assert got == pytest.approx(fabric.base_s() + max(rdma, nvlink), rel=1e-12)
    assert rdma > nvlink  # the 50 GB/s NIC bounds it, not the 450 GB/s NVLink
    # the all-to-all the runs send: a copy per (token, expert), 8 of them
    a2a = planner._collective(system, Parallel(dp=64, ep=64), "ep", "all_to_all", 8 * N)
    assert 6 * got < a2a
    # inside one domain only the NVLink leg; one rank, nothing
    one, f1 = planner._group(System("h100", 8, domain=8), 8, 1, 1, 8, "ep")
    u1 = f1.link(0, 0)[1]
    assert deepep.seconds(N, 8, 256, one, f1, "grouped") == pytest.approx(
        f1.base_s() + u1.latency_s + u1.wire_s(N * 1 * 7 / 8), rel=1e-12)
    alone, f0 = planner._group(System("h100", 8, domain=8), 8, 1, 1, 1, "ep")
    assert deepep.seconds(N, 8, 256, alone, f0, "grouped") == 0.0


def test_the_plan_model_charges_deepep_where_the_all_to_all_was():
    """AutoModel's DeepSeek-V3 row (DeepEP, its balanced gate): only the expert all-to-alls (and the
    bubble, which the slowest stage's time sets) change, each MoE layer's passes (forward, recompute,
    backward: 2 + 1 + 2 ... of dispatch and combine) at DeepEP's time instead of the all-to-all's."""
    row = BY_ID["automodel-h100x256-deepseek-v3"]
    assert training_frameworks.dispatch_of(row)[0] == {"dispatch": "deepep", "routing": "grouped"}
    megatron = BY_ID["mbridge-gb200x256-deepseek-v3-bf16"]  # (no DeepEP named: the runs' all-to-all)
    assert training_frameworks.dispatch_of(megatron) == ({"dispatch": "all_to_all"}, [])
    lay = vt.layout(row)
    assert any("DeepEP costed as a copy per domain" in a for a in lay.approximations)
    deep = vt.cost(row, lay)
    plain = vt.cost(dataclasses.replace(row, extras=tuple(e for e in row.extras if e != "DeepEP")), lay)
    for f in ("compute", "tensor_parallel", "data_parallel"):
        assert getattr(deep.breakdown, f) == getattr(plain.breakdown, f), f
    system, plan, c = vt.system_of(row), lay.plan, config_of(row.workload, row.seq_len)
    act = row.global_batch // plan.dp // plan.n_microbatches * c.seq_len * c.dim * 2
    a2a = planner._collective(system, plan, "ep", "all_to_all", c.top_k * act)
    group = planner._group(system, plan.dp, 1, plan.pp, plan.ep, "ep")
    dee = deepep.seconds(act, c.top_k, c.n_experts, *group, "grouped")
    moe = [sum(i >= c.n_dense_layers for i in stage_layers(c.n_layers, plan.pp, s)) for s in range(plan.pp)]
    assert moe == [12, 15, 15, 16]  # the slowest stage, in both: the last (the most MoE blocks, and the head)
    passes = plan.n_microbatches * moe[-1] * (2 + 1) * 2  # recompute: one forward more
    assert plain.breakdown.expert_all_to_all - deep.breakdown.expert_all_to_all == pytest.approx(passes * (a2a - dee))
    assert deep.step_s < 0.6 * plain.step_s
    with pytest.raises(ConfigError, match="dispatch = 'nccl' is not an expert dispatch; choose one of all_to_all"):
        planner.cost(system, row.workload, plan, row.global_batch, deep.memory, dispatch="nccl")
    # refused before any plan is measured: a bad routing, and DeepEP beside a skewed router (its hot experts'
    # all-to-all is the runs')
    small = System("h100", 8, domain=4)
    with pytest.raises(ConfigError, match="routing = 'skewed' is not a DeepEP routing"):
        planner.search(small, "moe-debug", 16, dispatch="deepep", routing="skewed")
    with pytest.raises(ConfigError, match="dispatch = 'deepep' with routing 'zipf:0.2'"):
        skew.search(small, "moe-debug", 16, "zipf:0.2", dispatch="deepep")


def test_each_pipeline_schedule_of_a_step_pays_its_bubble_and_its_gradient_sync():
    """AutoModel's 1,024-GPU row: GA 4, its loop calling the schedule once per local batch of 8
    microbatches (at the table's commit torch's stage reduce-scatters and reshards at each
    schedule's last backward): four bubbles, four syncs and four rounds of FSDP2's copy kernels
    where one schedule of 32 had one of each; the expert all-to-alls and p2p messages the same."""
    row = BY_ID["automodel-h100x1024-deepseek-v3"]
    assert row.schedules == 4
    lay = vt.layout(row)
    assert lay.plan.n_microbatches == 32
    four, one = vt.cost(row, lay), vt.cost(dataclasses.replace(row, schedules=1), lay)
    b4, b1 = four.breakdown, one.breakdown
    assert (b4.tensor_parallel, b4.expert_all_to_all) == (b1.tensor_parallel, b1.expert_all_to_all)
    assert b1.compute < b4.compute < 1.01 * b1.compute  # FSDP2's copy-in / copy-out kernels, once a schedule
    assert b4.data_parallel == pytest.approx(4 * b1.data_parallel, rel=1e-12)
    system = vt.system_of(row)
    # the p2p messages overlapped (async_p2p), the pipeline term is the bubble alone: all of it four times
    kw = dict(dtype="bf16", seq_len=row.seq_len, fusion=lay.fusion, attention="cudnn", async_p2p=True)
    p4, p1 = (planner.cost(system, row.workload, lay.plan, row.global_batch, four.memory, schedules=s, **kw)
              .breakdown.pipeline for s in (4, 1))
    assert p1 > 0 and p4 == pytest.approx(4 * p1, rel=1e-12)
    for bad in (3, 0, 64):
        with pytest.raises(ConfigError, match=f"schedules = {bad} is invalid"):
            planner.cost(system, row.workload, lay.plan, row.global_batch, four.memory, schedules=bad)
    with pytest.raises(ConfigError, match="schedules = 2 is invalid.*with pp > 1"):
        planner.cost(System("h100", 8, domain=8), "llama-debug", Parallel(dp=8, microbatches=2), 16, schedules=2)
