"""`relay validate --training --programs` (launch/validate_programs.py) without launching anything:
the rows' programs and the launches they make (or why not), torchtitan's own overrides for a row's
layout as torchtitan's own ConfigManager reads them, its log lines as a full-size launch printed
them (tests/assets/torchtitan/llama3_8b_h100x8_fake.log), the table, and bad input. The full-size
launch itself (~200 s host) is `relay validate --training --programs` / bench/titan_fullsize.py."""

from dataclasses import replace
from pathlib import Path

import pytest

from relay.errors import ConfigError
from relay.launch import cli
from relay.launch import validate_programs as vp
from relay.launch import validate_training as vt

ROWS = vt.load()
BY_ID = {r.id: r for r in ROWS}
ROW = BY_ID["torchtitan-h100x8-llama3-8b"]  # FSDP 8, local batch 2, seq 8192, selective AC: 5,762 tps/GPU
# `relay launch` of ROW's program on 8 H100 (fake tensors), its console as captured
LOG = Path(__file__).resolve().parents[1] / "assets" / "torchtitan" / "llama3_8b_h100x8_fake.log"


def test_every_torchtitan_row_is_launched_or_says_why_not(tmp_path):
    todo = vp.jobs(ROWS, vt.TRAINING, str(tmp_path))
    assert {j.row.id for j in todo} == {r.id for r in ROWS if "github.com/pytorch/torchtitan" in r.source}
    by = {(j.row.id, j.chip): j for j in todo}
    j = by[(ROW.id, "h100-hbm2e")]
    assert j.published == 5762 and not j.not_run
    argv = list(j.argv)
    assert argv[:9] == ["launch", "--chip", "h100-hbm2e", "--devices", "8", "--domain", "8", "--tensors", "fake"]
    assert argv[argv.index("-m") + 1:argv.index("-m") + 6] == ["torchtitan.train", "--module", "llama3", "--config",
                                                                 "llama3_8b"]
    assert argv[-1] == "activation_checkpoint:selective"  # (tyro's subcommand: last)
    for chip in ("b200", "ascend-910c"):  # Relay-only comparison lines: the same launch on another chip
        c = by[(ROW.id, chip)]
        tail = len(vp.overrides(ROW)[0])  # the same layout
        assert c.published is None and c.argv[1:3] == ("--chip", chip) and c.argv[-tail:] == j.argv[-tail:]
    big = [j for j in todo if j.row.devices > vp.MAX_DEVICES and not j.row.pp > 1 and not j.not_run]
    assert len(big) == 10 and all(j.argv and "--shared" in j.argv for j in big)  # shared launches
    # torchtitan's llama3_405b builds its float8 converter: the BF16 405B row is not launched with it
    j = by[("torchtitan-h100x128-llama3-405b-tp8", "h100-hbm2e")]
    assert not j.argv and "float8 converter" in j.not_run and "bf16 row" in j.not_run
    for j in big:  # torchtitan's TP mesh groups named by the --parallel hint
        hint = j.argv[j.argv.index("--parallel") + 1] if "--parallel" in j.argv else None
        assert hint == (f"dp={j.row.dp},tp={j.row.tp}" if j.row.tp > 1 else None), j.row.id
    assert "--shared" not in by[(ROW.id, "h100-hbm2e")].argv  # 8 devices: one actor each
    for j in todo:  # a row run with torch.compile: its kernels charged as Relay's fused chains
        assert ("--fusion" in j.argv) == ("torch.compile" in j.row.extras and bool(j.argv)), j.row.id
        assert "--fusion" not in j.argv or j.argv[j.argv.index("--fusion") + 1] == "fused"
    assert vp.why_not(replace(ROW, pp=2, dp=4)) == ""  # torchtitan's pipeline, one actor per device
    assert "shared run" in vp.why_not(replace(ROW, pp=2, dp=8, devices=16))
    # the FP8 rows: torchtitan's llama3_8b / 70b with its float8 converter (launch/titan_configs.py)
    fp8 = {j.row.id: j for j in todo if j.row.precision == "fp8"}
    assert {i: (j.row.devices, j.chip) for i, j in fp8.items()} == {
        "trainy-h200x32-llama3-8b-fp8": (32, "h200"), "trainy-h200x64-llama3-8b-fp8": (64, "h200"),
        "torchtitan-h100x64-llama3-8b-tp8-fp8-rowwise": (64, "h100-hbm2e"),
        "torchtitan-h100x256-llama3-70b-tp8-fp8-rowwise": (256, "h100-hbm2e")}
    for j in fp8.values():
        argv = list(j.argv)
        assert argv[argv.index("--module") + 1:argv.index("--module") + 4] == [
            "relay.launch.titan_configs", "--config", "llama3_70b_float8" if "70b" in j.row.id else "llama3_8b_float8"]
        assert any("rowwise" in a for a in j.approximations)  # what differs from the published run, said
    assert vp.why_not(replace(ROW, precision="fp8")) == ""  # an H100 has FP8
    for chip in ("a100", "ascend-910c"):  # as torchtitan's converter refuses them (capability < 8.9)
        assert "no FP8" in vp.why_not(replace(ROW, precision="fp8"), chip)


def test_the_overrides_give_torchtitan_the_rows_layout():
    """torchtitan's own ConfigManager (tyro) parses the flags: a misspelt flag or a wrong degree fails here."""
    manager = pytest.importorskip("torchtitan.config.manager")
    ac = pytest.importorskip("torchtitan.distributed.activation_checkpoint")
    cases = [(ROW, (2, 16, 8192, 8, 1, 1), ac.SelectiveAC.Config, False),
             (BY_ID["torchtitan-h100x64-llama3-8b-tp8"], (12, 96, 8192, 8, 1, 8), ac.SelectiveAC.Config, True),
             (BY_ID["torchtitan-h100x256-llama3-70b-tp8"], (16, 512, 8192, 32, 1, 8), ac.FullAC.Config, True),
             (replace(ROW, fsdp=False, recompute="none", micro_batch=1), (1, 16, 8192, 1, 8, 1), type(None), False)]
    for row, layout, policy, compiled in cases:
        c = manager.ConfigManager().parse_args(vp.program_args(row) + list(vp.TITAN_FLAGS) + vp.overrides(row)[0])
        p = c.parallelism
        assert (c.training.local_batch_size, c.training.global_batch_size, c.training.seq_len,
                p.data_parallel_shard_degree, p.data_parallel_replicate_degree, p.tensor_parallel_degree) == layout
        assert (p.pipeline_parallel_degree, p.context_parallel_degree, c.training.steps) == (1, 1, vp.STEPS)
        assert type(c.activation_checkpoint) is policy and c.compile.enable is compiled, row.id
        assert c.training.disable_cuda_graphs and c.metrics.log_freq == 1


def test_torchtitans_own_lines_are_read_from_rank_0():
    got = vp.parse(LOG.read_text())
    assert [s[0] for s in got["steps"]] == [1, 2, 3]
    assert got["steps"][-1] == (3, 51.81, 8911, 516.09, 52.18)  # step, memory GiB, tps, TFLOPS, MFU %
    assert (got["peak_flops"], got["device"], got["capacity_gib"]) == (9.89e14, "H100 SXM", 74.51)
    other = ("[rank 1] [titan] - INFO - step:  9  loss:  0.1  grad_norm:  0.1  memory: 1.00GiB(1%)  tps: 1  "
             "tflops: 1.00  mfu: 1.00%\n\x1b[32m[rank 0] [titan] - INFO - \x1b[39mstep:  4  loss:  0.00000  "
             "grad_norm:  0.0000  memory: 2.50GiB(3.36%)  tps: 12,345  tflops: 1,000.5  mfu: 10.00%\x1b[39m\n")
    assert vp.parse(other)["steps"] == [(4, 2.5, 12345, 1000.5, 10.0)]  # rank 1's line is not rank 0's
    float8 = ("[rank 0] [titan] 2026-12-07 05:40:52,655 - root - INFO - \x1b[31mstep:  3  \x1b[32mloss:  0.00000  "
              "grad_norm:  0.0000  memory: 43.40GiB(33.05%)  tps: 8,252  tflops: 477.91  \x1b[35mmfu: N/A\x1b[39m\n")
    assert vp.parse(float8)["steps"] == [(3, 43.4, 8252, 477.91, None)]  # torchtitan prints no MFU under float8


def test_bench_titan_fullsize_prints_na_where_torchtitan_gave_no_figure():
    """bench/titan_fullsize.py's lines of a float8 run (parse's MFU None) and of a console without the
    peak or device line (parse's None): "n/a (reason)", where it used to raise on formatting None."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("titan_fullsize", Path(__file__).resolve().parents[2] / "bench" /
                                                  "titan_fullsize.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    float8 = {"steps": [(3, 43.4, 8252, 477.91, None)], "peak_flops": None, "device": None, "capacity_gib": None}
    step = bench.step_line(*float8["steps"][-1])
    assert "tps 8,252" in step and "mfu n/a (torchtitan prints no MFU under float8)" in step
    own = bench.own_line(float8)
    assert "8,252 tps/GPU, 477.91 TFLOPS, MFU n/a (torchtitan prints no MFU under float8)" in own
    assert f"its peak n/a ({bench.NO_PEAK})" in own and f"device n/a ({bench.NO_DEVICE})" in own
    own = bench.own_line(vp.parse(LOG.read_text()))  # every figure there: printed as before
    assert "MFU 52.18%, its peak 989 TFLOPS for device 'H100 SXM', memory 51.81 GiB" in own and "n/a" not in own


def test_the_table_puts_the_programs_line_beside_the_plan_model_and_the_published_figure(tmp_path):
    todo = {(j.row.id, j.chip): j for j in vp.jobs(ROWS, vt.TRAINING, str(tmp_path))}
    done = [vp.result(todo[(ROW.id, "h100-hbm2e")], vp.parse(LOG.read_text()), 97.0, 0, str(LOG)),
            vp.result(todo[(ROW.id, "b200")], vp.parse(""), 3.0, 1, "b200.log"),
            {"job": replace(todo[("trainy-h200x32-llama3-8b-fp8", "h200")], argv=(),
                            not_run=vp.why_not(BY_ID["trainy-h200x32-llama3-8b-fp8"], "ascend-910c"))}]
    assert done[0]["figure"] == 8911
    text = vp.report(done, {(ROW.id, "h100-hbm2e"): 9215.0, (ROW.id, "b200"): 20000.0})
    first, failed, big = text.splitlines()[-3:]
    for words in ("5762", "tokens/s/GPU", "9,215", "8,911 (step 3)", f"{8911 / 5762:.3f}", "52.18% of 989",
                  "51.81", "97"):
        assert words in first
    assert "none (Relay only)" in failed and "failed (exit 1); console: b200.log" in failed
    assert "not run: ascend-910c has no FP8" in big
    # torchtitan takes the SXM's peak for the 500 W part, whose catalog peak is lower (an estimate)
    assert [n for n in vp.notes(done) if "MFU" in n] == [
        f"#   {ROW.id} on h100-hbm2e: torchtitan's MFU is against 989 TFLOPS, the peak it looks up for 'H100 SXM'; "
        f"against the catalog's BF16 peak, 886.8 TFLOPS, it is {52.18 * 989e12 / 1e12 / 886.8:.2f}% (emulated)"]
    seen = {**vp.parse(LOG.read_text()), "peak_flops": 312e12, "device": "Ascend 910C"}  # its fallback: A100's
    note = vp.notes([vp.result(todo[(ROW.id, "ascend-910c")], seen, 1.0, 0, "x.log")])[-1]
    assert note.endswith("torchtitan's MFU is against 312 TFLOPS, the peak it looks up for 'Ascend 910C'; against "
                         "the catalog's BF16 peak, 752 TFLOPS, it is 21.65% (emulated)")  # 52.18% x 312 / 752


def test_bad_input_is_refused_before_anything_launches(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"row 'torchtitan-h100x8-llama3-8b': program = 'megatron' is invalid"):
        vp.jobs([replace(ROW, program="megatron")], vt.TRAINING, str(tmp_path))
    with pytest.raises(ConfigError, match=r"precision = 'fp8' but program = .*llama3_8b' runs torchtitan in BF16.*"
                                          r"--module relay.launch.titan_configs --config llama3_8b_float8"):
        vp.jobs([replace(ROW, precision="fp8")], vt.TRAINING, str(tmp_path))
    path = tmp_path / "t.toml"
    path.write_text(vt.TRAINING.read_text().replace('chip = "ascend-910c"', 'chip = "ascend-910x"'))
    with pytest.raises(ConfigError, match="ascend-910x"):
        vp.jobs(ROWS, path, str(tmp_path))
    # a misspelt row id in a [[comparison]] is refused, not skipped in silence (as it was)
    table = vt.TRAINING.read_text()
    path.write_text(table.replace('row = "torchtitan-h100x8-llama3-8b"\nchip', 'row = "titan-8b"\nchip'))
    with pytest.raises(ConfigError, match=r"\[\[comparison\]\] row = 'titan-8b' is no row of the table"):
        vp.jobs(ROWS, path, str(tmp_path))
    assert cli.main(["validate", "--programs"]) == 2
    assert "--programs is given without --training" in capsys.readouterr().err
