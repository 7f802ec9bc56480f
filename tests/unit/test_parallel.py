"""relay.Parallel: the plan's arithmetic and the mesh's layout, checked without any process
(as torchtitan tests ParallelDims), and its refusals before any device starts."""

from dataclasses import replace

import pytest

from relay import Cluster, Parallel, System, TrainConfig
from relay.errors import ConfigError
from relay.launch.cli import build_parser, main
from relay.launch.options import config_from
from relay.workloads import get

LLAMA, MOE = get("llama-debug").config, get("moe-debug").config


@pytest.mark.parametrize("fields,match", [
    (dict(dp=0), r"parallel: dp = 0 is invalid; give an integer >= 1"),
    (dict(tp=1.5), r"parallel: tp = 1.5 is invalid"),
    (dict(pp=True), r"parallel: pp = True is invalid"),
    (dict(fsdp="yes", dp=2), r"parallel: fsdp = 'yes' is invalid; give True or False"),
    (dict(ac="selective"), r"parallel: ac = 'selective' is invalid; give full, op or layer:N"),
    (dict(ac="layer:0"), r"parallel: ac = 'layer:0' is invalid; give full, op or layer:N \(every Nth block"),
    (dict(recompute=True, ac="op"), r"parallel: recompute \(full activation checkpointing\) and ac = op are two"),
    (dict(dp=2, fsdp=True, dist_opt=True), r"parallel: dist_opt shards the optimizer state over dp, and fsdp"),
    (dict(pp=2, microbatches=0), r"parallel: microbatches = 0 is invalid"),
    (dict(stages=2), r"parallel: stages = 2 interleaves a pipeline's chunks and pp = 1; set pp > 1"),
    (dict(pp=2, stages=0), r"parallel: stages = 0 is invalid; give model chunks per pipeline rank >= 1"),
    (dict(sp=True), r"parallel: sp splits the sequence over the tensor-parallel group, and tp = 1; set tp > 1"),
    # torch's ScheduleInterleaved1F1B: max(1, 9 // 4) = 2 rounds, and 9 is not a multiple of 2
    (dict(pp=4, stages=2, microbatches=9), r"microbatches = 9 with pp = 4 and stages = 2: interleaved 1F1B "
                                           r"needs a multiple of its 2 rounds; choose microbatches = 8"),
])
def test_bad_fields_name_the_field_the_value_and_the_fix(fields, match):
    with pytest.raises(ConfigError, match=match):
        Parallel(**fields)


@pytest.mark.parametrize("plan,devices,domain,config,batch,match", [
    (Parallel(dp=4, tp=2, pp=2), 8, 8, LLAMA, 8, r"dp \(4\) x tp \(2\) x pp \(2\) = 16 != devices \(8\)"),
    (Parallel(dp=2, tp=4), 8, 2, LLAMA, 8, r"tp = 4 does not divide the scale-up domain \(2 devices\)"),
    (Parallel(tp=8), 8, 8, LLAMA, 8, r"tp = 8 does not divide n_heads = 4"),
    (Parallel(pp=4), 4, 4, LLAMA, 8, r"pp = 4 > n_layers = 2; give each stage a block"),
    (Parallel(pp=2, microbatches=3), 2, 2, LLAMA, 8, r"microbatches = 3 does not divide the batch of a replica"),
    (Parallel(dp=2, microbatches=3), 2, 2, LLAMA, 4, r"microbatches = 3 does not divide the batch of a replica "
                                                     r"\(4 samples\)"),
    (Parallel(dp=2, ep=2), 2, 2, LLAMA, 8, r"ep = 2 needs a mixture of experts"),
    (Parallel(dp=8, ep=8, tp=1), 8, 8, MOE.__class__(**{**MOE.__dict__, "n_experts": 12}), 8,
     r"ep = 8 does not divide n_experts = 12"),
    (Parallel(tp=2), 2, 2, None, 8, r"tp, pp and ep split a transformer of this project"),
    (Parallel(dp=4, ep=3), 4, 4, MOE, 8, r"parallel: ep = 3 does not divide dp = 4; .* choose ep dividing dp"),
    (Parallel(tp=2, fsdp=True), 2, 2, LLAMA, 8, r"fsdp shards over the data-parallel replicas, and dp = 1; set dp > 1"),
    (Parallel(pp=2, stages=2), 2, 2, replace(LLAMA, n_layers=6), 8,
     r"stages = 2 with pp = 2: pp x stages = 4 chunks do not divide n_layers = 6"),
    (Parallel(tp=2, sp=True), 2, 2, replace(LLAMA, seq_len=33), 8,
     r"sp with tp = 2 does not divide seq_len = 33; choose tp dividing the sequence or drop sp"),
])
def test_a_plan_that_does_not_fit_is_refused(plan, devices, domain, config, batch, match):
    with pytest.raises(ConfigError, match=match):
        plan.check(devices, domain, config, batch)


def test_plans_that_fit_pass():
    Parallel(dp=2, tp=2, pp=2).check(8, 4, LLAMA, 8)
    Parallel(dp=4, ep=2, fsdp=True).check(4, 4, MOE, 4)
    Parallel(dp=8).check(8, 1, None, 8)  # data parallel takes any model, across domains
    Parallel(pp=2, stages=2, tp=2, sp=True).check(4, 4, replace(LLAMA, n_layers=4), 8)
    Parallel(pp=4, stages=2, microbatches=10).check(4, 4, replace(LLAMA, n_layers=8), 10)  # 2 rounds of 5
    Parallel(dp=2, microbatches=4).check(2, 2, None, 8)  # gradient accumulation needs no pipeline


def test_activation_checkpointing_spellings_and_recompute_are_one_setting():
    assert Parallel.parse("dp=2,recompute") == Parallel(dp=2, ac="full") == Parallel.parse("dp=2,ac=full")
    assert str(Parallel(dp=2, ac="full")) == "dp=2,recompute"  # the bare word stays the printed form
    for text in ("dp=2,ac=op", "dp=2,ac=layer:2", "dp=2,dist_opt", "dp=2,microbatches=4"):
        assert str(Parallel.parse(text)) == text and Parallel.parse(text) == Parallel.parse(str(Parallel.parse(text)))
    p = Parallel.parse("dp=2,ac=layer:3")
    assert (p.ac_mode, p.ac_every, p.recompute) == ("layer", 3, False)
    assert (Parallel().ac_mode, Parallel(ac="op").ac_mode, Parallel(recompute=True).ac_mode) == ("none", "op", "full")
    with pytest.raises(ConfigError, match=r"dist_opt \(the distributed optimizer\) is modelled by `relay plan` only"):
        TrainConfig(workload="llama-debug", parallel="dp=2,dist_opt")


def test_parse_reads_the_command_line_form_and_prints_it_back():
    p = Parallel.parse("tp=8,dp=9,fsdp")
    assert (p.dp, p.tp, p.pp, p.ep, p.fsdp, p.recompute) == (9, 8, 1, 1, True, False)
    assert Parallel.parse(str(p)) == p
    assert Parallel.parse("dp=4,pp=2,microbatches=8,recompute") == Parallel(dp=4, pp=2, microbatches=8,
                                                                             recompute=True)
    p = Parallel.parse("pp=2,stages=2,tp=2,sp")
    assert p == Parallel(pp=2, stages=2, tp=2, sp=True) and str(p) == "tp=2,pp=2,stages=2,sp"
    assert Parallel.parse(str(p)) == p and Parallel(tp=2, pp=2, stages=2, sp=True).fill(8).dp == 2
    with pytest.raises(ConfigError, match=r"parallel: 'cp' in 'cp=2' is unknown; use dp=, tp="):
        Parallel.parse("cp=2")
    with pytest.raises(ConfigError, match=r"parallel: tp = 'two' in 'tp=two' is not an integer"):
        Parallel.parse("tp=two")


def test_mesh_keeps_tensor_parallel_inside_a_domain_then_experts_then_replicas_then_stages():
    plan, domain = Parallel(dp=4, ep=2, tp=2, pp=2), 4  # 16 devices, domains of 4
    groups = lambda dim: sorted({tuple(plan.group(dim, d)) for d in range(16)})  # noqa: E731
    assert groups("tp") == [(2 * i, 2 * i + 1) for i in range(8)]
    for g in groups("tp") + groups("ep"):  # tp x ep = 4 devices: both inside a domain
        assert len({d // domain for d in g}) == 1
    assert groups("ep") == [(0, 2), (1, 3), (4, 6), (5, 7), (8, 10), (9, 11), (12, 14), (13, 15)]
    assert groups("dp") == [(0, 2, 4, 6), (1, 3, 5, 7), (8, 10, 12, 14), (9, 11, 13, 15)]
    assert groups("pp") == [(d, d + 8) for d in range(8)]
    # each replica is its own share of the batch, shared by its tensor-parallel and pipeline devices
    assert [plan.coords(d)["dp"] for d in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert plan.coords(9)["dp"] == plan.coords(1)["dp"] and plan.coords(9)["pp"] == 1


def test_a_sweep_point_fills_dp_with_what_tp_and_pp_leave():
    assert Parallel(tp=2, pp=2, fsdp=True).fill(16) == Parallel(dp=4, tp=2, pp=2, fsdp=True)
    with pytest.raises(ConfigError, match=r"tp \(2\) x pp \(2\) does not divide devices \(6\)"):
        Parallel(tp=2, pp=2).fill(6)


def test_train_config_takes_a_plan_as_text_and_records_it():
    c = TrainConfig(workload="llama-debug", parallel="dp=2,tp=2", per_device_batch=3)
    assert c.parallel == Parallel(dp=2, tp=2)
    assert c.replicas(4) == 2 and c.global_samples(4) == 6  # a replica's batch, not a device's
    assert c.as_dict()["parallel"] == "dp=2,tp=2"
    assert TrainConfig(workload="mlp").global_samples(4) == 32  # no plan: every device a replica


def test_the_command_line_option_and_the_preflight():
    args = build_parser().parse_args(["run", "--chip", "h100", "--devices", "4", "--workload", "llama-debug",
                                      "--parallel", "tp=2,dp=2,fsdp"])
    assert config_from(args).parallel == Parallel(dp=2, tp=2, fsdp=True)
    cluster = Cluster(System("h100", 4, domain=2))  # not started: the checks need no device
    with pytest.raises(ConfigError, match=r"dp \(2\) x tp \(1\) x pp \(1\) = 2 != devices \(4\)"):
        cluster.preflight("llama-debug", parallel="dp=2")
    assert cluster.actors == []


def test_breakeven_refuses_plans_it_cannot_run_before_any_device(capsys, tmp_path):
    assert main(["breakeven", "--fast", "h100", "--fast-devices", "3", "--slow", "a100", "--workload",
                 "llama-debug", "--parallel", "tp=2", "--out", str(tmp_path)]) == 2
    assert "breakeven: the fast system's 3 devices do not take --parallel tp=2 (it needs a multiple of " \
        "tp x pp x ep = 2, at least 2)" in capsys.readouterr().err
    # the full-size break-even picks each count's plan by the plan search: a fixed plan is refused, not ignored
    assert main(["breakeven", "--fast", "nvl72", "--slow", "cloudmatrix384", "--workload", "llama3-70b",
                 "--parallel", "tp=8", "--out", str(tmp_path)]) == 2
    assert "--parallel tp=8: the full-scale break-even gives each device count its best plan" in \
        capsys.readouterr().err
