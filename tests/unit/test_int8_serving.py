"""W8A8 INT8 serving (`relay serve --precision int8`, as CloudMatrix-Infer serves DeepSeek on the
910C): the catalog's optional INT8 peak, Linear and expert GEMMs at it with 1-byte operands, weights
stored in one byte, tokens dispatched in INT8 and combined in BF16; refused where a chip has no peak."""

import pytest
import torch
from _device import one_thread  # noqa: F401  (tests/unit is on the path)

from relay import Cluster, System, chips
from relay.analytic import planner, serving
from relay.errors import ConfigError
from relay.kernels import fp8
from relay.kernels.cost import CostModel
from relay.launch import cli
from relay.parallel import Parallel

pytestmark = pytest.mark.usefixtures("one_thread")
C910 = chips.get("ascend-910c")


def test_the_910c_int8_peak_is_an_estimate_twice_bf16_and_other_chips_have_none():
    assert C910.peak_flops("int8") == 2 * C910.peak_flops("bf16")
    assert C910.is_estimate("int8_tops") and "Da Vinci" in C910.sources["int8_tops"]
    with pytest.raises(ConfigError, match="'h100' has no int8 peak .* choose a chip with int8 \\(ascend-910c"):
        chips.get("h100").peak_flops("int8")


@pytest.mark.parametrize("extra,match", [('int8_tops = 10\n', "no source for int8_tops"),
                                         ('int8_tops = -1\n[toy.sources]\nint8_tops = "x"\n', "int8_tops = -1")])
def test_catalog_int8_needs_a_positive_sourced_figure(tmp_path, extra, match):
    figures = dict(bf16_tflops=100, fp8_tflops='"none"', hbm_gb=16, hbm_tbps=1, scaleup_gbps=10,
                   scaleup_latency_us=1, scaleout_gbps='"unknown"', scaleout_latency_us=1, power_w='"unknown"')
    body = "[toy]\n" + "".join(f"{k} = {v}\n" for k, v in figures.items()) + extra
    if "[toy.sources]" not in extra:
        body += "[toy.sources]\n"
    body += "".join(f'{k} = "x"\n' for k in ("bf16_tflops", "hbm_gb", "hbm_tbps", "scaleup_gbps",
                                             "scaleup_latency_us", "scaleout_latency_us"))
    (tmp_path / "c.toml").write_text(body)
    with pytest.raises(ConfigError, match=match):
        chips.load(tmp_path / "c.toml")


def test_an_int8_linear_gemm_runs_at_twice_the_rate_on_one_byte_operands():
    m, k, n = 8192, 7168, 4096  # compute-bound on the 910C in both precisions
    a, b, out = (torch.empty(s, device="meta") for s in ((m, k), (k, n), (m, n)))
    mm = torch.ops.aten.mm.default
    bf16, int8 = (serving.ServingCost(C910, d).op_parts(mm, (a, b), None, out) for d in ("bf16", "int8"))
    assert int8[0] == bf16[0]  # the same FLOPs
    assert int8[3] == pytest.approx(2 * bf16[3], rel=1e-12)  # the INT8 peak at the same efficiency
    assert bf16[1] - int8[1] == m * k + k * n  # each operand one byte an element instead of two
    t_bf16, t_int8 = (serving.ServingCost(C910, d).op_cost(mm, (a, b), None, out).seconds for d in ("bf16", "int8"))
    launch = C910.launch_us / 1e6
    assert t_int8 - launch == pytest.approx((t_bf16 - launch) / 2, rel=1e-12)


def test_a_programs_own_fp8_gemm_is_still_refused_on_the_910c_under_int8():
    with pytest.raises(fp8.NoFp8, match="no FP8"):
        serving.ServingCost(C910, "int8")._scaled_mm_speedup()


def test_int8_serves_only_training_refuses_it():
    with pytest.raises(ValueError, match="int8 is a serving precision"):
        CostModel(C910, "int8")
    with pytest.raises(ConfigError, match="int8 is a serving precision"):
        Cluster(System("ascend-910c", 2), dtype="int8")
    with pytest.raises(ValueError, match="int8 is a serving precision"):
        planner.cost(System("ascend-910c", 2), "llama-debug", Parallel(dp=2), 4, dtype="int8")


def test_int8_serving_stores_weights_in_a_byte_and_dispatches_int8_combines_bf16():
    system = System("ascend-910c", 4)
    layout = serving.Layout(4, 1, 4)
    bf16, int8 = (serving.serve("moe-debug", system, layout, 4, 16, 8, dtype=d) for d in ("bf16", "int8"))
    assert int8.prefill.params == bf16.prefill.params
    assert int8.memory["weights"] == bf16.prefill.params and bf16.memory["weights"] == 2 * bf16.prefill.params
    assert int8.memory["kv_cache"] == bf16.memory["kv_cache"]  # the cache stays in BF16
    comm = {d: serving.communication("moe-debug", layout, system, d, 4, 16) for d in ("bf16", "int8")}
    assert comm["int8"]["combine"] == comm["bf16"]["combine"]
    assert 0 < comm["int8"]["dispatch"] < comm["bf16"]["dispatch"]
    assert int8.ttft_s < bf16.ttft_s and int8.tpot_s < bf16.tpot_s


def test_cli_refuses_int8_on_a_chip_without_an_int8_peak(capsys):
    assert cli.main(["serve", "--workload", "llama-debug", "--chip", "h100", "--devices", "4",
                     "--precision", "int8"]) == 2
    assert "no int8 peak" in capsys.readouterr().err
    assert cli.main(["serve", "--workload", "deepseek-v3", "--system", "cloudmatrix384", "--breakeven", "nvl72",
                     "--tpot-ms", "50", "--precision", "int8"]) == 2
    assert "give --fast-precision bf16 (or fp8)" in capsys.readouterr().err


def test_relay_chips_shows_the_int8_peak_where_there_is_one(capsys):
    assert cli.main(["chips"]) in (0, None)
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line[:1].isalnum()}
    assert "INT8 TOPS" in rows["chip"] and "1504 (est.)" in rows["ascend-910c"]
    assert "1504" not in rows["h100"]
