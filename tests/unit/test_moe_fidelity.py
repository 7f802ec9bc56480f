"""The MoE rows of `relay validate --training` (issue 26): how Megatron syncs expert gradients
(its DDP's buckets, overlapped with the backward like the dense ones: analytic/megatron.py), by
hand and on the NeMo 25.02 Mixtral 8x7B row on 8 HGX B200 nodes, where the expert data-parallel
group crosses the nodes (analytic, no Ray)."""

import math

import pytest

from relay import System
from relay.analytic import megatron, planner
from relay.launch import validate_training as vt
from relay.parallel import Parallel

BY_ID = {r.id: r for r in vt.load()}
MIXTRAL_B200 = "nemo2502-b200x64-mixtral-8x7b-fp8"  # 8 nodes of 8 B200, EP 8 inside a node


def test_megatron_buckets_by_hand():
    dp = frozenset({"dp"})
    # Megatron's DDP bucket: max(40e6, 1e6 x dp) parameters; Relay's runs keep their own default
    assert megatron.bucket_bytes(1e6, 8, 2, dp) == 80e6
    assert megatron.bucket_bytes(1e6, 64, 2, dp) == 128e6
    assert megatron.bucket_bytes(1e6, 64, 2, frozenset()) == 1e6
    # expert gradients: one all-reduce per tensor in Relay's runs, Megatron's buckets under "dp"
    assert megatron.messages(96, 1.1e9, 8, 2, frozenset()) == 96
    assert megatron.messages(96, 1.1e9, 8, 2, dp) == math.ceil(1.1e9 / 80e6) == 14
    assert megatron.messages(96, 1e6, 8, 2, dp) == 1
    # exposed: the runs sync experts after the backward; Megatron hides both behind it
    assert megatron.buckets(0.4, 0.3, 0.5, 0.01, frozenset()) == pytest.approx(0.4 + 0.01)
    assert megatron.buckets(0.4, 0.3, 0.5, 0.01, dp) == pytest.approx(0.2)
    assert megatron.buckets(0.1, 0.3, 0.5, 0.01, dp) == 0.01  # all hidden but the last bucket


def test_expert_gradients_hide_behind_the_backward_only_under_megatrons_overlap():
    """A plan whose expert replicas span two nodes: its exposed data-parallel time is the runs'
    per-tensor expert all-reduces plus the buckets' excess, or under "dp" what outlasts the backward."""
    system = System("h100", 16, domain=8)
    plan = Parallel(dp=16, ep=8, microbatches=2, dist_opt=True)
    runs, mega = (planner.cost(system, "moe-debug", plan, 64, overlap=o) for o in ((), ("dp",)))
    assert mega.breakdown.data_parallel < runs.breakdown.data_parallel
    assert mega.breakdown.compute <= runs.breakdown.compute  # fewer bucket cats, the same model kernels
    assert (mega.breakdown.tensor_parallel, mega.breakdown.expert_all_to_all) == \
        (runs.breakdown.tensor_parallel, runs.breakdown.expert_all_to_all)


def test_the_mixtral_b200_row_exposes_only_what_outlasts_the_backward():
    """NeMo 2.0 runs overlap_grad_reduce with the distributed optimizer (dp > 1): the 5.6e9 expert
    parameters' gradients, reduced over the 8 nodes, and the 1.6e9 dense ones hide behind the last
    microbatch's backward; before, the experts' 1,024 per-tensor all-reduces (and 3,200 1-MB dense
    buckets) were charged exposed and the row ran at 0.66x of the published figure."""
    row = BY_ID[MIXTRAL_B200]
    lay = vt.layout(row)
    assert (lay.plan.dp, lay.plan.ep, lay.plan.dp_outer, row.domain) == (64, 8, 8, 8)
    assert lay.plan.group("ep", 0) == list(range(8))  # expert parallel inside a node, as Megatron
    assert lay.plan.group("dp_outer", 0) == list(range(0, 64, 8))  # expert replicas: one per node
    x = vt.run(row, best=False)
    r = planner.cost(vt.system_of(row), row.workload, lay.plan, row.global_batch, x["memory"], dtype=lay.dtype,
                     seq_len=lay.seq_len, fusion=lay.fusion, overlap=lay.overlap)
    assert r.breakdown.data_parallel < 0.25 * r.step_s
    assert 0.9 < x["ratio"] < 1.1


def test_bench_moe_rows_costs_each_row_as_validate_training_does():
    """bench/moe_rows.py breaks down the step `relay validate --training` gives a row, so it costs the
    row with the same attention kernels (training_frameworks.attention_of: cuDNN for AutoModel's TE
    layers): without them its H100 DeepSeek-V3 row read 0.621 where validate reads 0.651."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / "moe_rows.py"
    spec = importlib.util.spec_from_file_location("moe_rows", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = BY_ID["automodel-h100x256-deepseek-v3"]
    r, _ = bench.costed(row)
    x = vt.run(row, best=False)
    assert r.step_s == pytest.approx(x["step_s"], rel=1e-12)
