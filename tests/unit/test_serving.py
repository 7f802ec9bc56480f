"""The serving model (analytic/serving.py, serving_search.py) and `relay serve`: fake equals real in
every emulated figure, the KV cache charged as HBM traffic and capacity, layouts checked before
anything runs, the search's batch the largest meeting the target."""

import pytest
from _device import one_thread  # noqa: F401  (tests/unit is on the path)

from relay import System
from relay.analytic import serving, serving_search
from relay.errors import ConfigError
from relay.launch import cli
from relay.workloads import inference, llama, moe

H100x4 = System("h100", 4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name,layout", [("llama-debug", serving.Layout(2, 2, 1)),
                                         ("moe-debug", serving.Layout(2, 2, 4)),
                                         ("moe-debug", serving.Layout(4, 1, 2))])


def test_fake_equals_real_in_every_figure(name, layout):
    for tokens, context in ((12, 12), (1, 20)):  # a prefill, a decode step
        real, fake = (serving.phase(name, layout, H100x4, "bf16", 3, tokens, context, tensors=t)
                      for t in ("real", "fake"))
        assert real == fake
        assert fake.seconds > 0 and fake.flops > 0


@pytest.mark.parametrize("name,tp", [("llama-debug", 1), ("llama-debug", 2), ("moe-debug", 1), ("moe-debug", 2)])


def test_decode_reads_the_whole_kv_cache(name, tp):
    """A decode step's HBM traffic grows with the context by exactly the cache it reads, once: GQA's
    keys and values (their kv heads split tp ways); MLA's latent and rotary rows, whole on every tp rank."""
    c = (llama.CONFIGS | moe.CONFIGS)[name]
    batch, layout = 3, serving.Layout(4 // tp, tp, 1)
    short, long = (serving.phase(name, layout, H100x4, "bf16", batch, 1, n) for n in (20, 30))
    per_token = inference.cache_bytes_per_token(c) // (1 if name == "moe-debug" else tp)
    assert long.bytes - short.bytes == 10 * batch * per_token * c.n_layers
    assert long.seconds > short.seconds


def test_full_size_deepseek_memory_and_rates():
    system = System.preset("cloudmatrix384").scaled(32)
    s = serving.serve("deepseek-v3", system, serving.Layout(32, 1, 32), 16, 1024, 256)
    c = moe.CONFIGS["deepseek-v3"]
    assert s.memory["kv_cache"] == 16 * (1024 + 256) * (512 + 64) * 2 * c.n_layers  # MLA's compressed cache
    assert s.memory["weights"] == s.prefill.params * 2
    # 256 routed experts over 32 devices: 8 each, so about 671e9 x 8/256 + the rest per device
    assert 25e9 < s.prefill.params < 45e9
    assert s.decode_tps == pytest.approx(16 / s.tpot_s)
    assert s.prefill_tps == pytest.approx(s.prefill_batch * 1024 / s.ttft_s)
    assert s.decode.a2a_s > 0 and s.decode.tp_s == 0
    assert s.fits
    # a prefill batch whose prompts outweigh the decode batch's sequences holds their cache
    big = serving.serve("deepseek-v3", system, serving.Layout(32, 1, 32), 16, 1024, 256, prefill_batch=64)
    assert big.memory["kv_cache"] == 64 * 1024 * (512 + 64) * 2 * c.n_layers


@pytest.mark.parametrize("layout,match", [
    (serving.Layout(3, 1, 1), "dp x tp = 3"),
    (serving.Layout(1, 4, 1), "heads"),  # llama-debug has 2 kv heads
    (serving.Layout(4, 1, 2), "no experts"),
])


def test_bad_layouts_are_refused(layout, match):
    with pytest.raises(ConfigError, match=match):
        serving.serve("llama-debug", H100x4, layout, 2, 8, 4)


def test_cli_refuses_bad_input_before_running(capsys):
    for argv, match in ((["--parallel", "dp=3"], "dp x tp = 3"), (["--batch", "0"], "--batch = 0"),
                        (["--parallel", "pp=2"], "'pp=2'"), (["--tpot-ms", "50"], "add --search"),
                        (["--precision", "fp8", "--system", "cloudmatrix384"], "no fp8 peak"),
                        (["--search", "--parallel", "dp=4", "--batch", "8"], "--parallel, --batch: --search and "
                         "--breakeven choose the layout"),
                        (["--breakeven", "nvl72", "--no-overlap"], "--no-overlap: --search and --breakeven"),
                        (["--fast-precision", "fp8"], "--fast-precision = 'fp8' is the fast side's precision"),
                        (["--shared", "--search"], "--shared runs one layout's step on the devices"),
                        (["--shared", "--parallel", "dp=2,tp=2"], "runs on the devices take tp=1"),
                        (["--shared", "--routing", "uniform"], "--routing uniform with --shared")):
        system = [] if "--system" in argv else ["--chip", "h100", "--devices", "4"]
        base = ["serve", "--workload", "llama-debug", *system]
        assert cli.main(base + argv) == 2
        assert match in capsys.readouterr().err


def test_shared_refuses_a_layout_over_the_hbm_before_any_device_starts(capsys, monkeypatch):
    """DeepSeek-V3 on 4 H100 needs ~386 GB a device (its weights alone ~361 GB): the analytic memory
    refuses it, naming the figures and the fix, before a cluster (and its Ray) starts."""
    import ray

    from relay.driver import cluster

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started for a layout that does not fit")
    monkeypatch.setattr(cluster, "Cluster", no_cluster)
    ray_before = ray.is_initialized()
    assert cli.main(["serve", "--chip", "h100", "--devices", "4", "--workload", "deepseek-v3", "--shared"]) == 2
    err = capsys.readouterr().err
    assert "--shared with layout dp=4,tp=1,ep=4 of deepseek-v3: needs 386.1 GB per device" in err
    assert "but h100 has 80 GB of HBM" in err
    # the weights alone (361 GB) are over the HBM: fewer sequences would not do
    assert "fewer sequences" not in err and "give more devices (--devices, now 4)" in err
    # the weights fit, the cache does not: fewer sequences would
    assert cli.main(["serve", "--chip", "h100", "--devices", "4", "--workload", "llama3-8b", "--input-len", "8192",
                     "--batch", "4096", "--shared"]) == 2
    assert "give fewer sequences per replica (--batch, now 4096" in capsys.readouterr().err
    assert "a larger ep" in err
    assert ray.is_initialized() == ray_before


def test_bisection_finds_the_largest_batch_meeting_a_monotone_test():
    for hi in range(1, 40):
        for limit in range(0, hi + 3):
            assert serving_search._largest(lambda b, limit=limit: b <= limit, hi) == min(limit, hi)


def test_search_takes_the_largest_batch_meeting_the_target():
    two = System("h100", 2)
    target = serving.serve("llama-debug", two, serving.Layout(2, 1, 1), 5, 16, 8).tpot_s * 1e3
    best = serving_search.search("llama-debug", two, 16, 8, tpot_ms=target, max_batch=12, phases=("decode",))
    d = best.decode
    assert [str(x[0]) for x in best.tried] == ["dp=2,tp=1,ep=1", "dp=1,tp=2,ep=1"]
    assert 5 <= d.batch < 12 and d.tpot_s * 1e3 <= target
    assert serving.serve("llama-debug", two, d.layout, d.batch + 1, 16, 8).tpot_s * 1e3 > target
    assert d.decode_tps == max(x.decode_tps for _, x, _ in best.tried if x)


def test_cli_prints_the_figures_with_units(capsys):
    assert cli.main(["serve", "--chip", "h100", "--devices", "4", "--workload", "moe-debug", "--input-len", "16",
                     "--output-len", "8", "--batch", "4", "--parallel", "dp=4,tp=1,ep=4"]) == 0
    out = capsys.readouterr().out
    assert "(emulated ms)" in out and "tokens/s per device" in out
    assert "dp=4,tp=1,ep=4" in out and "GB of 80 GB HBM" in out


def test_inference_validate_rows_hold_their_recorded_figures():
    """A cheap row (a prefill at its source's layout, full size) within 1% of the table's relay column:
    a model change that moves it must update the table (`relay validate --inference --update`)."""
    from relay.launch import validate_serving
    rows = [r for r in validate_serving.load() if r.id == "sglang-h100x32-prefill"]
    assert len(rows) == 1
    for x in validate_serving.evaluate(rows):
        assert x["relay"] == pytest.approx(x["row"].relay, rel=0.01), x["row"].id


def test_balanced_splits_send_and_receive_every_row_with_one_role():
    """Each device sends and receives exactly `rows` (the serving model's balanced routing), the
    receive counts are what the peers send it, and every device's row is device 0's rotated (so
    one device's recording stands for all: the Recorder rebuilds the matrix from its row and column)."""
    from relay.device.fake.record import Recorder

    class G:  # the members a Recorder's exchange sees of a group
        size, rank = 6, 0
    for rows in (12, 14, 5):
        S = [inference.balanced_splits(rows, 6, r)[0] for r in range(6)]
        for r in range(6):
            send, recv = inference.balanced_splits(rows, 6, r)
            assert sum(send) == sum(recv) == rows
            assert recv == [S[p][r] for p in range(6)]
            assert send == S[0][-r:] + S[0][:-r] if r else send == S[0]
        for r in range(6):
            G.rank = r
            assert Recorder.exchange(None, G, *inference.balanced_splits(rows, 6, r)) == S


def test_validate_inference_takes_validate_trainings_verdict(capsys):
    """One verdict for both tables (launch/validate_training.py's summary and verdict): the median
    over the rows not used for fitting, the worst row named, no bound on the worst (issue 29's
    target bounds the median only)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["validate", "--inference", "--only", "sglang-h100x32-prefill"])
    assert e.value.code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("PASS: median |error| ") and "over the 1 row(s) run and not used for fitting " \
        "(target <= 15%), worst sglang-h100x32-prefill" in line and "beyond" not in line


def test_validate_inference_with_only_fit_rows_has_nothing_to_judge(tmp_path, capsys):
    """Every row run marked `fit` (or --only of fit rows): no median over nothing (it printed nan),
    but "nothing to judge" and a miss; --only matching no row is refused, as --training's is."""
    from dataclasses import replace

    from relay.launch import validate_serving as vs
    from relay.launch.validate_training import summary, verdict
    rows = [replace(r, fit=True) for r in vs.load()[:2]]
    s = summary([{"row": r, "err": 0.01} for r in rows], bound=None)
    assert s["held_out"] == 0 and s["median_abs_err"] is None and s["worst_abs_err"] is None
    ok, line = verdict(s, vs.TARGET_MEDIAN)
    assert not ok and line == "MISS: no row run that was not used for fitting: nothing to judge (2 row(s) run)"
    table = tmp_path / "serving.toml"  # the cheap prefill row marked fit
    table.write_text(vs.SERVING.read_text().replace('id = "sglang-h100x32-prefill"\n',
                                                    'id = "sglang-h100x32-prefill"\nfit = true\n'))
    with pytest.raises(SystemExit) as e:
        cli.main(["validate", "--inference", "--table", str(table), "--only", "sglang-h100x32-prefill"])
    assert e.value.code == 1
    out = capsys.readouterr().out
    nothing = "MISS: no row run that was not used for fitting: nothing to judge"
    assert out.strip().splitlines()[-1] == f"{nothing} (1 row(s) run)" and "nan" not in out
    assert cli.main(["validate", "--inference", "--only", "no-such-row"]) == 2
    assert "--only = 'no-such-row' matches no row id" in capsys.readouterr().err
