"""`relay validate --training`: the published training-throughput table, the mapping of a row's
layout to the plan Relay costs (and the approximations it names), the regression guard on the
table's `relay` column, and the command's table and verdict (analytic, no Ray)."""

import dataclasses

import pytest

from relay.analytic import planner
from relay.errors import ConfigError
from relay.launch import cli, training_frameworks, validate
from relay.launch import validate_training as vt
from relay.workloads import get as get_workload

ROWS = vt.load()
BY_ID = {r.id: r for r in ROWS}
# the regression guard runs the issue's three rows and cheap dense ones (a second or less each,
# one fake-tensor block measurement per shard); `relay validate --training` runs them all
GUARDED = ["automodel-h100x64-llama3-70b", "mbridge-gb200x256-deepseek-v3-bf16", "automodel-h100x256-deepseek-v3",
           "torchtitan-h100x8-llama3-8b", "torchtitan-a100x64-llama3-8b-sac-op", "mbridge-gb200x8-llama3-8b-fp8",
           "mbridge-h100x64-llama3-70b-fp8"]


def test_the_table_is_complete_and_checkable():
    assert len(ROWS) >= 20
    assert len({r.chip for r in ROWS} & {"a100", "h100", "h200", "b200", "b200-hgx"}) >= 4
    moe = {r.workload for r in ROWS if hasattr(get_workload(r.workload).config, "n_experts")}
    assert moe and {r.workload for r in ROWS} - moe  # dense and MoE
    assert {"bf16", "fp8"} <= {r.precision for r in ROWS}
    for r in ROWS:
        assert r.source.startswith("https://") and "(" in r.source, f"{r.id}: give the URL and the table"
        assert r.published > 0 and r.unit == vt.METRICS[r.metric], r.id
        assert r.tp * r.pp * r.cp * r.dp == r.devices and r.global_batch % (r.dp * r.micro_batch) == 0, r.id
        assert r.relay > 0 or vt.layout(r).approximations, f"{r.id}: no Relay figure; run --training --update"


def test_the_issues_three_rows_are_there_as_published():
    a = BY_ID["automodel-h100x64-llama3-70b"]
    assert (a.devices, a.global_batch, a.seq_len, a.cp, a.dp, a.fsdp) == (64, 128, 8192, 2, 32, True)
    assert a.published == 866.77
    b = BY_ID["mbridge-gb200x256-deepseek-v3-bf16"]
    assert (b.devices, b.global_batch, b.seq_len, b.pp, b.stages, b.ep) == (256, 4096, 4096, 4, 4, 64)
    assert b.published == 3139
    c = BY_ID["automodel-h100x256-deepseek-v3"]
    assert (c.devices, c.global_batch, c.pp, c.ep, c.fsdp, c.published) == (256, 512, 4, 64, True, 1002)


def test_layout_names_every_approximation_and_drops_them_when_the_planner_costs_them():
    row = BY_ID["mbridge-h100x1024-llama3-405b-fp8"]  # tp8 pp8 vp8 cp2 dp8, fp8, seq 8192
    unlearnt = {k: False for k in vt.PLANNER_COSTS}
    lay = vt.layout(row, unlearnt)
    assert (lay.plan.dp, lay.plan.tp, lay.plan.pp, lay.plan.stages, lay.dtype) == (8, 8, 8, None, "bf16")
    assert (lay.seq_len, lay.devices) == (4096, 512)  # one CP rank of each pair, on its half of each sequence
    assert lay.plan.n_microbatches == 512 // 8  # the pipeline keeps the replica's micro-batches under cp
    text = " | ".join(lay.approximations)
    assert "cp=2 run as one CP rank per group: 512 devices on sequences of 4096 tokens" in text
    assert "8 virtual stages run as plain 1F1B" in text
    assert "FP8 run as BF16" in text
    full = vt.layout(row)  # what the planner costs today: virtual stages and FP8 among them
    assert full.plan.stages == 8 and full.dtype == "fp8" and full.plan.dist_opt  # (Megatron's optimizer)
    assert not any("virtual stages run" in a or "FP8" in a for a in full.approximations)
    assert "126 blocks in 64 uneven chunks (Megatron's split) costed as even ones" in full.approximations
    acc = vt.layout(BY_ID["automodel-h100x64-llama3-70b"], unlearnt)  # pp 1, cp 2, GA 4 of micro-batch 1
    assert acc.plan.recompute and acc.plan.fsdp and acc.plan.microbatches is None
    assert (acc.plan.dp, acc.seq_len, acc.devices) == (64, 8192, 64)  # no pipeline: cp folds into dp
    assert "cp=2 run as 2x data parallel" in acc.approximations[0]
    assert "2 accumulated micro-batches of 1 run as one of 2 samples" in acc.approximations  # (per dp=64 replica)
    assert vt.layout(BY_ID["automodel-h100x64-llama3-70b"]).plan.microbatches == 2  # (accumulated, as published)
    sel = vt.layout(BY_ID["torchtitan-h100x8-llama3-8b"], unlearnt)
    assert not sel.plan.recompute and sel.approximations == ("selective recompute run as none",)
    sel = vt.layout(BY_ID["torchtitan-h100x8-llama3-8b"])
    assert sel.plan.ac == "op" and sel.approximations == ()


def test_the_llama3_papers_asynchronous_p2p_is_costed_as_overlapped():
    """The Llama 3 paper's pipeline sends and receives asynchronously (section 3.3.2): its rows pay
    the p2p messages only in the bubble's chain, where the default (torch's schedules, as the runs
    use them) exposes each of the v x m microbatch-chunks' messages, one each way."""
    row = BY_ID["llama3-paper-h100x8192-405b"]
    lay, system = vt.layout(row), vt.system_of(row)
    act = 1 * row.seq_len * 16384 * 2  # one sample of s x d at bf16
    p2p = 2 * system.link(0, system.devices // row.pp).seconds(act)
    kw = dict(dtype=lay.dtype, seq_len=lay.seq_len)
    exposed = planner.cost(system, row.workload, lay.plan, row.global_batch, **kw)
    overlapped = planner.cost(system, row.workload, lay.plan, row.global_batch, **kw, async_p2p=True)
    assert exposed.breakdown.pipeline - overlapped.breakdown.pipeline == pytest.approx(32 * 8 * p2p, rel=1e-9)
    assert overlapped.breakdown.compute == exposed.breakdown.compute
    assert vt.run(row, best=False)["step_s"] == pytest.approx(overlapped.step_s, rel=1e-12)
    assert training_frameworks.ASYNC_P2P in row.extras and row.extras[0].startswith(vt.MODELLED)


def test_a_bad_row_is_refused_naming_the_row_the_field_and_the_fix(tmp_path):
    text = vt.TRAINING.read_text()
    for old, new, words in [('precision = "bf16"', 'precision = "fp4"', "precision = 'fp4' is invalid"),
                            ("dp = 32\n", "dp = 31\n", "tp x pp x cp x dp must be devices"),
                            ('chip = "h100"', 'chip = "h1000"', "h1000"),
                            ("fit = false", "fits = false", "unknown field(s) fits"),
                            ("fit = false", "fit = false\nschedules = 2", "schedules = 2 is invalid; give 1, or"),
                            ("schedules = 4", "schedules = 3", "schedules = 3 is invalid; give 1, or")]:
        path = tmp_path / "t.toml"
        path.write_text(text.replace(old, new, 1))
        with pytest.raises(ConfigError, match="automodel-h100x(64-llama3-70b|1024-deepseek-v3)|h1000") as e:
            vt.load(path)
        assert words in str(e.value)


@pytest.mark.parametrize("row_id", GUARDED)
def test_no_training_figure_moves_without_the_table(row_id):
    """As test_validate.py's guard: a change that moves Relay's figure for a published run by more
    than REGRESSION_TOL updates the `relay` column in the same change (--training --update)."""
    row = BY_ID[row_id]
    got = vt.run(row, best=False)["relay"]
    assert got == pytest.approx(row.relay, rel=validate.REGRESSION_TOL), (
        f"{row.id}: Relay now gives {got:.4g} {row.unit} (table: {row.relay:.4g}, published {row.published:g}); "
        "if the model change is meant, run `relay validate --training --update`")


def test_summary_takes_the_rows_run_and_not_fit_and_lists_the_misses():
    r0, r1, r2, r3 = ROWS[:4]
    results = [{"row": r0, "err": 0.05}, {"row": r1, "err": 0.08}, {"row": r2, "not_run": "why"},
               {"row": dataclasses.replace(r3, fit=True), "err": 0.0}]
    s = vt.summary(results)
    assert (s["ran"], s["held_out"], s["not_run"]) == (3, 2, [r2.id])
    assert s["median_abs_err"] == pytest.approx(0.065) and s["worst_id"] == r1.id and not s["misses"]
    assert vt.verdict(s)[0]
    s = vt.summary(results + [{"row": ROWS[4], "err": 0.3}])
    ok, line = vt.verdict(s)
    assert not ok and s["misses"] == [ROWS[4].id] and "1 row(s) beyond 25%" in line


def test_the_command_prints_the_table_the_notes_and_the_verdict(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["validate", "--training", "--only", "^automodel-h100x64-llama3-70b$"])
    out = capsys.readouterr().out
    assert e.value.code in (0, 1)
    assert "automodel-h100x64-llama3-70b" in out and "866.77" in out and "tokens/s/GPU" in out
    assert "dp=64,microbatches=2,fsdp,recompute" in out  # the published layout as Relay ran it (GBS 128, MBS 1)
    assert "cp=2 run as 2x data parallel" in out and "fused kernels run as Relay's fused chains" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith(("PASS: ", "MISS: ")) and "over the 1 row(s) run and not used for fitting" in last


def test_update_rewrites_the_relay_column_of_the_rows_run(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(vt.TRAINING.read_text())
    validate.update(path, [{"row": ROWS[1], "relay": 1234.5678}])
    rows = vt.load(path)
    assert rows[1].relay == 1235.0 and [r.relay for r in rows[2:]] == [r.relay for r in ROWS[2:]]
    assert [r.published for r in rows] == [r.published for r in ROWS]


def test_a_layout_relay_cannot_place_is_reported_not_run_with_the_reason():
    row = dataclasses.replace(BY_ID["torchtitan-h100x64-llama3-8b-tp8"], domain=4)  # tp 8 over domains of 4
    x = vt.run(row, best=False)
    assert "tp = 8 does not divide the scale-up domain (4 devices)" in x["not_run"] and "relay" not in x
    assert vt.summary([x])["not_run"] == [row.id]
    assert "not run: parallel: tp = 8" in vt.notes([x])[0] and "not run" in vt.report([x])


def test_a_context_parallel_fold_that_drops_attention_is_not_run():
    """cp under a pipeline runs one CP rank on 1/cp of each sequence: at 128K tokens (the Llama 3
    paper's CP 16 row) that leaves out about half of the model FLOPs (attention), so the row is not
    run; at 8K with cp 2 (Megatron's 405B rows) the attention dropped is a few % and the row runs."""
    x = vt.run(BY_ID["llama3-paper-h100x16384-405b-cp16"], best=False)
    assert "leaves out 54% of the row's model FLOPs" in x["not_run"] and "needs a CP dimension" in x["not_run"]
    y = vt.run(BY_ID["mbridge-b200x128-llama3-405b-fp8"], best=False)
    assert "not_run" not in y and y["ratio"] > 0


def test_automodels_rows_run_eager_around_transformer_engine_unless_compiled():
    """AutoModel's DeepSeek-V3 configs name no torch.compile: TE's layers in an eager model, costed
    eager and said so; its Llama 3 70B config compiles: fused. Neither lists TE as not modelled."""
    for row_id, fusion in (("automodel-h100x256-deepseek-v3", "eager"), ("automodel-h100x1024-deepseek-v3", "eager"),
                           ("automodel-h100x64-llama3-70b", "fused")):
        row = BY_ID[row_id]
        lay = vt.layout(row)
        assert lay.fusion == fusion, row_id
        assert any(a.startswith("Transformer Engine's layers in an eager model") for a in lay.approximations) == \
            (fusion == "eager"), row_id
        assert not [e for e in vt.run(row, best=False)["extras"] if "Transformer Engine" in e or e == "DeepEP"], row_id
