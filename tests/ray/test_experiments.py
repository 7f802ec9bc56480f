"""Sweeps, break-even, results folders and the experiment commands, on tiny configurations."""

import csv
import json
import math

import pytest

from relay import System, TrainConfig
from relay.driver.experiment import breakeven, predict_point, run_point, search, sweep
from relay.driver.metrics import STEP_COLUMNS
from relay.launch.cli import main

FAST_LINKS = dict(scaleup_gbps=1e9, scaleup_latency_us=1e-9, link_model="ideal")  # communication made negligible


def test_a_sweep_reuses_the_actors(cluster):
    cluster.configure(System("h100", 1))
    pids = list(cluster.pids)
    settings = TrainConfig(workload="mlp", steps=2, per_device_batch=4)
    systems = [System(c, n) for c in ("h100", "a100") for n in (1, 2, 4)]
    points = sweep(cluster, systems, ["ring", "tree"], settings, capacity=8)
    assert len(points) == 12 and not any(p.predicted for p in points)
    assert cluster.pids == pids  # no actor started or replaced between points
    assert {(p.row["chip"], p.row["devices"], p.row["algorithm"]) for p in points} == \
        {(c, n, a) for c in ("h100", "a100") for n in (1, 2, 4) for a in ("ring", "tree")}


def test_breakeven_with_negligible_communication_is_the_step_time_ratio(cluster):
    settings = TrainConfig(workload="mlp", steps=2, per_device_batch=4, batch_scale=512)
    fast, slow = System("h100", 3, **FAST_LINKS), System("a100", 64, **FAST_LINKS)
    t_fast = run_point(cluster, fast.scaled(1), "ring", settings).row["step_s"]
    t_slow = run_point(cluster, slow.scaled(1), "ring", settings).row["step_s"]
    expected = math.ceil(3 * t_slow / t_fast)
    assert expected > 3  # a100 is the slower chip here: more than one device per h100
    result = breakeven(cluster, fast, slow, "ring", settings, capacity=8)
    assert result.devices == expected
    # verified: the count just below was run and falls short; throughput grew with every count
    assert result.below.system.devices == expected - 1 and not result.below.predicted
    assert result.verified is True and result.row()["verified"] is True
    assert result.row()["below_value"] < result.fast_value and result.non_monotone == []
    assert result.naive_devices == pytest.approx(3 * 989.4 / 312)
    assert 0.99 < result.efficiency <= 1.0 + 1e-9


def test_search_finds_the_smallest_passing_count_from_any_guess():
    for answer in (1, 2, 7, 30, 100):
        for guess in (1, 5, 29, 31, 64):
            calls = []
            found = search(lambda n: calls.append(n) or n >= answer, guess, 1, 128)
            assert found == answer, (answer, guess)
            assert len(calls) <= 2 * math.log2(128) + 2
    assert search(lambda n: False, 3, 1, 16) is None


def test_prediction_equals_a_real_run_without_overlap(cluster):
    """Past the machine's size a point is predicted: measured compute plus the local executor's
    all-reduce. Without overlap nothing else enters, so it must equal the real run."""
    settings = TrainConfig(workload="gpt-tiny", steps=2, per_device_batch=2, overlap=False)
    small = run_point(cluster, System("h100", 2), "ring", settings)
    real = run_point(cluster, System("h100", 6), "ring", settings)
    pred = predict_point(small, System("h100", 6), settings)
    assert pred.predicted and pred.row["predicted"]
    assert pred.row["step_s"] == pytest.approx(real.row["step_s"], rel=1e-9)
    assert pred.row["tokens_per_s"] == pytest.approx(real.row["tokens_per_s"], rel=1e-9)


def test_breakeven_past_the_host_capacity_is_marked_predicted(cluster):
    settings = TrainConfig(workload="mlp", steps=2, per_device_batch=4, batch_scale=512)
    result = breakeven(cluster, System("h100", 4), System("tpu-v5e", 256), "ring", settings, capacity=3)
    assert result.devices > 3 and result.slow.predicted and result.row()["predicted"]
    assert any(not p.predicted for p in result.probes) and any(p.predicted for p in result.probes)


def test_time_to_loss_breakeven_runs(cluster):
    settings = TrainConfig(workload="mlp", steps=12, per_device_batch=8)
    result = breakeven(cluster, System("h100", 2), System("a100", 64), "ring", settings, capacity=8,
                       metric="time-to-loss", target_loss=0.4, max_devices=6)
    assert result.metric == "time-to-loss" and result.fast_value > 0
    if result.devices:
        assert result.slow_value <= result.fast_value


def test_time_to_loss_breakeven_is_reached_where_it_must_be(cluster):
    # the slow side is the fast system's own chip and fabric: 2 of its devices train exactly as the
    # fast system does, so they reach the loss as soon, and the break-even is at most 2
    settings = TrainConfig(workload="mlp", steps=12, per_device_batch=8)
    result = breakeven(cluster, System("h100", 2), System("h100", 64), "ring", settings, capacity=8,
                       metric="time-to-loss", target_loss=0.4, max_devices=6)
    assert result.devices in (1, 2), [(p.system.devices, p.row["step_s"]) for p in result.probes]
    assert result.slow_value <= result.fast_value


# ---------------------------------------------------------------- the commands, end to end
def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    return out.out


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_relay_run_writes_a_results_folder_and_a_trace(ray_session, tmp_path, capsys):
    out = run_cli(capsys, "run", "--chip", "h100", "--devices", "2", "--workload", "mlp", "--steps", "3",
                  "--per-device-batch", "4", "--out", str(tmp_path), "--name", "r", "--trace")
    assert "step time" in out and "emulated ms" in out and "real s" in out
    folder = tmp_path / "r"
    for f in ("config.json", "steps.csv", "summary.json", "trace.json", "loss.png", "step_breakdown.png"):
        assert (folder / f).exists(), f
    assert list(read_csv(folder / "steps.csv")[0]) == STEP_COLUMNS
    config = json.loads((folder / "config.json").read_text())
    assert config["system"]["chip"]["bf16_tflops"] == 989.4 and config["versions"]["torch"]
    assert "matmul_gflops_per_core" in config["host"] and "git_commit" in config
    trace = json.loads((folder / "trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1} and {e["tid"] for e in spans} == {0, 1}
    assert all(e["dur"] >= 0 for e in spans)


def test_relay_run_checks_once_and_records_one_training_config(ray_session, tmp_path, capsys, monkeypatch):
    from relay.driver import training
    calls = []
    real = training.preflight
    monkeypatch.setattr(training, "preflight", lambda *a: calls.append(a) or real(*a))
    run_cli(capsys, "run", "--chip", "h100", "--devices", "2", "--workload", "mlp", "--steps", "2",
            "--out", str(tmp_path), "--name", "once", "--clock", "wall")
    assert len(calls) == 1  # the wall clock's probe steps too: one preflight per run
    record = json.loads((tmp_path / "once" / "config.json").read_text())["training"]
    defaults = TrainConfig(workload="mlp")
    assert record["steps"] == 2 and record["workload"] == "mlp"
    assert record["per_device_batch"] == TrainConfig.DEFAULT_PER_DEVICE_BATCH  # the one default
    assert (record["bucket_mb"], record["seed"], record["warmup"]) == (defaults.bucket_mb, defaults.seed,
                                                                       defaults.warmup)


def test_relay_sweep_and_report(ray_session, tmp_path, capsys):
    out = run_cli(capsys, "sweep", "--chips", "h100,a100", "--devices", "1,2", "--algorithms", "ring,direct",
                  "--workload", "mlp", "--steps", "2", "--out", str(tmp_path), "--name", "s")
    assert sum(line.rstrip().endswith(" emulated") for line in out.splitlines()) == 8  # all run, none predicted
    assert "measured" not in out and "power basis" in out and out.count(" chip ") >= 8  # energy on chip power
    folder = tmp_path / "s"
    rows = read_csv(folder / "points.csv")
    assert len(rows) == 8 and {"tokens_per_s", "energy_per_sample_j", "predicted"} <= set(rows[0])
    assert list(read_csv(folder / "steps.csv")[0])[:5] == ["point", "system", "chip", "devices", "algorithm"]
    (folder / "throughput.png").unlink()
    out = run_cli(capsys, "report", str(folder))
    assert "throughput.png" in out and (folder / "throughput.png").exists()


def test_relay_sweep_strong_scaling(ray_session, tmp_path, capsys):
    run_cli(capsys, "sweep", "--chips", "h100", "--devices", "1,2,4", "--scaling", "strong",
            "--global-batch", "8", "--workload", "mlp", "--steps", "2", "--out", str(tmp_path), "--name", "st")
    rows = read_csv(tmp_path / "st" / "points.csv")
    assert [(int(r["devices"]), int(r["per_device_batch"])) for r in rows] == [(1, 8), (2, 4), (4, 2)]


def test_relay_breakeven_writes_its_summary(ray_session, tmp_path, capsys):
    out = run_cli(capsys, "breakeven", "--fast", "h100", "--fast-devices", "2", "--slow", "a100",
                  "--workload", "mlp", "--steps", "2", "--batch-scale", "256", "--max-devices", "8",
                  "--out", str(tmp_path), "--name", "b")
    assert "break-even slow devices" in out
    folder = tmp_path / "b"
    for f in ("config.json", "steps.csv", "summary.json", "points.csv", "throughput.png", "step_breakdown.png",
              "summary.md"):
        assert (folder / f).exists(), f
    summary = json.loads((folder / "summary.json").read_text())
    row = summary["breakeven"][0]
    assert row["break_even_devices"] >= 2 and row["naive_devices"] == pytest.approx(2 * 989.4 / 312)
    md = (folder / "summary.md").read_text()
    assert "naive" in md
    # the search's own check, in the output, summary.json and summary.md
    n = row["break_even_devices"]
    assert f"# {row['algorithm']}: one device fewer ({n - 1}) falls short, as it must" in out
    assert row["verified"] is True and row["below_devices"] == n - 1 and f"| {n - 1}: " in md
    # bare chips, not presets: no full-system prediction and no published comparison
    assert "SemiAnalysis" not in md and "Full systems" not in md and "chip" in row["slow_power_basis"]


def test_relay_bench_results_folder(ray_session, tmp_path, capsys):
    out = run_cli(capsys, "bench", "--chip", "h100", "--devices", "8", "--algorithm", "ring,tree",
                  "--executor", "local", "--max-bytes", "1M", "--out", str(tmp_path), "--name", "bw")
    assert "emul busbw (GB/s)" in out and (tmp_path / "bw" / "busbw.png").exists()


def test_presets_fill_options_and_the_command_line_wins(ray_session, tmp_path, capsys):
    out = run_cli(capsys, "run", "--preset", "gpt-tiny-h100x4", "--steps", "2", "--workload", "mlp",
                  "--out", str(tmp_path))
    config = json.loads((tmp_path / "gpt-tiny-h100x4" / "config.json").read_text())
    assert config["training"]["steps"] == 2 and config["training"]["workload"] == "mlp"
    assert config["training"]["devices"] == 4 and "4 x h100" in out


def test_bad_presets_are_refused(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('command = "run"\ncolour = "red"\n')
    assert main(["run", "--preset", str(bad)]) == 2
    assert "unknown option(s) colour" in capsys.readouterr().err
    assert main(["run", "--preset", "no-such-preset"]) == 2
    assert "preset = 'no-such-preset' is unknown" in capsys.readouterr().err
    assert main(["sweep", "--preset", "gpt-tiny-h100x4"]) == 2
    assert "is for `relay run`" in capsys.readouterr().err
