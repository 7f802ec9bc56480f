"""Parallelism plans in real mode (relay.Parallel through PyTorch's own DDP, FSDP2, tensor
parallelism, pipelining and an expert all-to-all on the `relay` backend) against one process
training on the global batch (`train_single`).

Tolerance: fp32, plain SGD (lr 0.5, 3 steps): every weight within 1e-5 absolute and every
step's loss within 1e-5 relative. The devices add the same terms in another order (gradients
averaged over replicas, partial matmuls summed over the tensor-parallel group, microbatch
gradients accumulated), which moves fp32 results by a few 1e-7 (measured: at most 1.5e-7 on
these plans); a wrong plan (a gradient not averaged, an expert's tokens lost, a head dropped)
moves them by 1e-3 or more. SGD, because AdamW divides by the root of a tiny second moment,
which turns rounding in a near-zero gradient into a difference of up to lr in that weight; the
AdamW case compares the losses only."""

import dataclasses
import json
import math

import pytest
import torch
import torch.distributed as dist

from relay import Parallel, System, TrainConfig, train_single
from relay.driver.experiment import breakeven
from relay.launch.cli import main
from relay.parallel import DIMS
from relay.workloads import analytic, get, llama
from relay.workloads.routing import Histogram

STEPS, BATCH, LR, TOL = 3, 4, 0.5, 1e-5

PLANS = [  # (workload, plan): each kind alone (DDP alone: test_backend.py), then 3-D combinations on 8 devices
    ("llama-debug", "dp=4,fsdp"),
    ("llama-debug", "tp=2"),
    ("llama-debug", "pp=2,microbatches=4"),
    ("llama-debug", "dp=2,pp=2"),  # DDP under a pipeline schedule
    ("moe-debug", "dp=4,ep=4"),
    ("llama-debug", "dp=2,tp=2,pp=2,fsdp,recompute"),
    ("moe-debug", "dp=2,ep=2,tp=2"),
    ("moe-debug", "dp=4,ep=2,pp=2,fsdp"),
    # one step each (the suite's budget): the first loss and the weights after one update
    ("llama-debug-4", "dp=2,pp=2,stages=2,microbatches=4"),  # interleaved 1F1B: 2 chunks of 1 block per rank
    ("llama-debug", "dp=2,tp=2,sp"),  # sequence parallel
    ("moe-debug", "tp=2,sp"),
    # gradient accumulation without a pipeline (2 microbatches, one sync: DDP's and FSDP2's), and
    # torchtitan's selective activation checkpointing (op level; layer level, every 2nd block)
    ("llama-debug", "dp=2,microbatches=2"),
    ("moe-debug", "dp=2,ep=2,fsdp,microbatches=2"),
    ("llama-debug", "dp=2,tp=2,ac=op"),
    ("llama-debug", "dp=2,ac=layer:2"),
]
ONE_STEP = {"dp=2,pp=2,stages=2,microbatches=4", "dp=2,tp=2,sp", "tp=2,sp", "dp=2,tp=2,ac=op", "dp=2,ac=layer:2"}


FAKE_TOO = ("tp=2", "dp=2,pp=2", "dp=2,tp=2,pp=2,fsdp,recompute", "dp=2,pp=2,stages=2,microbatches=4",
            "dp=2,tp=2,sp", "dp=2,microbatches=2", "dp=2,tp=2,ac=op")  # each part of a plan, on fake tensors too


def workload(name: str):
    """A debug configuration; llama-debug-4: llama-debug with 4 blocks (pp=2 x stages=2 chunks)."""
    if name == "llama-debug-4":
        return llama.workload("llama-debug", dataclasses.replace(llama.CONFIGS["llama-debug"], n_layers=4))
    return get(name)


def system_for(plan: Parallel) -> System:
    """Domains of 4: tensor and expert parallelism inside one, data parallelism across two."""
    return System("h100", plan.devices, domain=min(plan.devices, 4))


@pytest.mark.parametrize("name,text", PLANS, ids=[f"{w}:{t}" for w, t in PLANS])
def test_plan_equals_one_process_training(cluster8, name, text):
    plan, wl, steps = Parallel.parse(text), workload(name), 1 if text in ONE_STEP else STEPS
    cluster8.configure(system_for(plan), clock="virtual")
    res = cluster8.train(wl, parallel=plan, steps=steps, per_device_batch=BATCH, optimizer="sgd", lr=LR)
    losses, state = train_single(wl, steps, plan.dp * BATCH, optimizer="sgd", lr=LR)
    assert res.losses == pytest.approx(losses, rel=TOL)
    assert set(res.state_dict) == set(state)  # every weight, experts and stages included, came back
    for k, v in state.items():
        torch.testing.assert_close(res.state_dict[k], v, atol=TOL, rtol=0, msg=k)
    # the data-parallel trainer's columns, in emulated seconds, and a sensible breakdown
    assert res.config["global_batch"] == plan.dp * BATCH and res.config["parallel"] == str(plan)
    for s in res.steps:
        assert s["step_s"] > 0 and s["compute_s"] > 0 and s["flops"] > 0
        assert s["comm_s"] > 0 and 0 <= s["exposed_comm_s"] <= s["step_s"]
        assert (s["pipeline_wait_s"] > 0) == (plan.pp > 1)
    if text == "tp=2":
        # the throttle sees DTensor ops, not the local ops DTensor runs, and charges their local
        # tensors: each device its share of the sharded matmuls, the head's vocab / tp logits
        # included (plans.vocab_parallel), so exactly half the batch's 6NT + attention (the head
        # whole: 0.58; charged by the DTensors' global shapes, each device cost 0.95)
        whole = analytic.llama_flops(wl.config, plan.dp * BATCH * wl.tokens_per_sample)
        assert all(r["flops"] == pytest.approx(whole / 2, rel=1e-12) for rows in res.per_device for r in rows)
    ops = {name for rows in res.per_device for r in rows for name in r["spans"]}
    assert ("recv" in ops) == (plan.pp > 1) and ("all_to_all" in ops) == (plan.ep > 1)
    if text in FAKE_TOO:  # fake tensors: the same charges and messages (MoE: test_fake_moe_...)
        fake = cluster8.train(wl, parallel=plan, steps=steps, per_device_batch=BATCH, optimizer="sgd", lr=LR,
                              tensors="fake")
        assert _times(fake) == _times(res)
        assert fake.state_dict == {} and all(math.isnan(x) for x in fake.losses)  # fake tensors hold no values


def _times(res) -> list:
    """Every device's emulated figures and spans, step by step (what fake tensors must reproduce)."""
    keys = ("start_s", "end_s", "compute_s", "comm_s", "exposed_comm_s", "pipeline_wait_s", "flops", "spans")
    return [[{k: r[k] for k in keys} for r in rows] for rows in res.per_device]


def test_fake_moe_with_recorded_routing_equals_real(cluster8):
    """Fake tensors route by a routing model; a histogram of a real run's counts makes them route
    as it did. Every replica is given the same samples, so one device's counts are every device's."""
    moe = get("moe-debug")
    same = dataclasses.replace(moe, batches=lambda rank, world, b, seed: moe.batches(0, world, b, seed))
    plan = Parallel(dp=2, ep=2, tp=2)
    cluster8.configure(system_for(plan), clock="virtual")
    real = cluster8.train(same, parallel=plan, steps=1, per_device_batch=BATCH)
    counts = real.per_device[0][0]["routing"]
    assert len(counts) == moe.config.n_layers - moe.config.n_dense_layers and sum(counts[0]) > 0
    fake = cluster8.train(same, parallel=plan, steps=1, per_device_batch=BATCH, tensors="fake",
                          routing=Histogram(counts))
    assert _times(fake) == _times(real)  # (skewed routing: tests/ray/test_shared.py)


def test_adamw_on_a_3d_plan_follows_one_process_losses(cluster8):
    plan, wl = Parallel(dp=2, tp=2, pp=2, fsdp=True), get("llama-debug")
    cluster8.configure(system_for(plan), clock="virtual")
    res = cluster8.train(wl, parallel=plan, steps=STEPS, per_device_batch=BATCH)
    losses, _ = train_single(wl, STEPS, plan.dp * BATCH)
    assert res.losses == pytest.approx(losses, rel=TOL)


def _mesh_groups(shape):
    """What torch's own DeviceMesh makes of the plan's shape: each device's groups."""
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=DIMS)
    groups = {d: dist.get_process_group_ranks(mesh.get_group(d)) for d in ("tp", "ep", "pp")}
    groups["dp"] = dist.get_process_group_ranks(mesh["dp_outer", "ep"]._flatten("dp").get_group())
    return groups


def test_torch_mesh_puts_each_device_where_the_plan_says(cluster8):
    plan = Parallel(dp=4, ep=2, tp=2)
    cluster8.configure(System("h100", 8, domain=4), clock="virtual")
    res = cluster8.launch(_mesh_groups, plan.shape)
    for d, got in enumerate(res.results):
        assert got == {dim: plan.group(dim, d) for dim in ("tp", "ep", "pp", "dp")}
        assert {m // 4 for m in got["tp"]} == {d // 4}  # tensor parallel inside the scale-up domain


def test_relay_run_takes_a_plan(cluster8, tmp_path, capsys):
    assert main(["run", "--chip", "h100", "--devices", "4", "--domain", "2", "--workload", "llama-debug",
                 "--parallel", "dp=2,pp=2", "--steps", "2", "--out", str(tmp_path), "--name", "p"]) == 0
    out = capsys.readouterr().out
    assert "parallel dp=2,pp=2" in out and "pipeline wait (in other)" in out
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["training"]["parallel"] == "dp=2,pp=2" and config["training"]["global_batch"] == 16
    assert len((tmp_path / "p" / "steps.csv").read_text().splitlines()) == 3


def test_relay_sweep_fills_dp_with_each_points_devices(cluster8, tmp_path, capsys):
    assert main(["sweep", "--chips", "h100", "--devices", "2,4", "--workload", "llama-debug", "--parallel", "tp=2",
                 "--steps", "2", "--out", str(tmp_path), "--name", "s"]) == 0
    assert "parallel tp=2 with dp = devices / (tp x pp)" in capsys.readouterr().out
    points = json.loads((tmp_path / "s" / "summary.json").read_text())["points"]
    assert [(p["devices"], p["global_batch"], p["predicted"]) for p in points] == [(2, 8, False), (4, 16, False)]


def test_breakeven_with_a_plan_probes_only_the_counts_it_takes(cluster8):
    """tp=2 on both sides, dp filled from each count: every probe an even count, its plan tp=2 x dp."""
    settings = TrainConfig(workload="llama-debug", parallel="tp=2", steps=1, per_device_batch=2)
    result = breakeven(cluster8, System("h100", 2), System("a100", 8), "auto", settings, capacity=8)
    probes = [result.fast, *result.probes]
    assert len(result.probes) >= 2 and all(p.system.devices % 2 == 0 and not p.predicted for p in probes)
    for p in probes:
        assert p.result.config["parallel"] == str(Parallel(tp=2, dp=p.system.devices // 2))
        assert p.row["global_batch"] == p.system.devices // 2 * 2
    n = result.devices
    assert n is not None and n % 2 == 0  # a100 reaches two h100 within 8 devices
    assert result.verified is (True if n > 2 else None) and (result.below is None) == (n == 2)


@pytest.mark.parametrize("text", ["dp=2", "dp=2,fsdp"])
def test_gradient_accumulation_syncs_once_a_step(cluster8, text):
    """4 microbatches without a pipeline: DDP's buckets all-reduce once, in the last backward;
    FSDP2 gathers and reduce-scatters each microbatch (into the shards, as torchtitan)."""
    plan = Parallel.parse(text)
    cluster8.configure(system_for(plan), clock="virtual")
    runs = [cluster8.train("llama-debug", parallel=p, steps=1, per_device_batch=BATCH, tensors="fake")
            for p in (plan, dataclasses.replace(plan, microbatches=4))]
    counts = [{k: len(v) for k, v in res.per_device[0][0]["spans"].items() if isinstance(v, list)} for res in runs]
    if plan.fsdp:
        assert counts[1]["all_gather"] == 4 * counts[0]["all_gather"] > 0
        assert counts[1]["reduce_scatter"] == 4 * counts[0]["reduce_scatter"] > 0
    else:
        assert counts[1]["all_reduce"] == counts[0]["all_reduce"] > 0
