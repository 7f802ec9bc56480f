"""The break-even as a distribution (emulator/analytic/uncertainty.py), on hand-made plan models:
the step's analytic scaling, seeded sampling, and a zero range giving a point."""

import pytest

from relay.analytic import uncertainty as u

FAST = u.PointModel(72, 1000.0, compute=1.0, comm=0.1, pipeline=0.0, gemm=0.5, hbm=0.25)
# slow counts 100..400: the same plan shape, throughput growing with the count
SLOW = [u.PointModel(n, 15.0 * n, compute=4.0, comm=0.4, pipeline=0.0, gemm=0.5, hbm=0.25,
                     skew=((0.1, 0.4, 0.2), (0.3, 1.2, 0.6))) for n in range(100, 401, 20)]


def inputs(width: float) -> tuple:
    row = {"slow_gemm": 1, "slow_hbm": 1, "slow_link": 1, "fast_gemm": 1, "fast_hbm": 1, "fast_link": 1}
    out = [u.Input(k, k, 1 - width, 1.0, 1 + width, "test") for k in row]
    out += [u.Input("skew", "skew", 0.0, 0.0, width, "test"),
            u.Input("slow_rate", "rate", 1e-5, 1e-5 * (1 + width), 1e-5 * (1 + 2 * width), "test", log=True),
            u.Input("fast_rate", "rate", 1e-5, 1e-5, 1e-5, "test", log=True)]
    return tuple(out)


def test_step_scales_by_hand():
    # k = 0.5 / 0.5 + 0.25 / 1 + 0.25 = 1.5: compute 1.0 -> 1.5, comm 0.1 / 0.5 = 0.2
    assert FAST.step_s(gemm=0.5, link=0.5) == pytest.approx(1.5 + 0.2)
    # skew 0.2: halfway between the grid's 0.1 and 0.3 terms: compute + 0.8, all-to-all + 0.4
    p = SLOW[0]
    assert p.step_s(s=0.2) == pytest.approx(4.0 + 0.8 + 0.4 + 0.4)
    assert p.step_s(s=0.05) == pytest.approx(4.0 + 0.2 + 0.4 + 0.1)  # from balanced to the first point


def test_a_seeded_sample_is_the_same_twice_and_another_seed_differs():
    a, b = (u.sample(FAST, SLOW, inputs(0.2), n=400, seed=7) for _ in range(2))
    a.pop("host_s"), b.pop("host_s")
    assert a == b
    c = u.sample(FAST, SLOW, inputs(0.2), n=400, seed=8)
    assert a["throughput"]["p10"] <= a["throughput"]["p50"] <= a["throughput"]["p90"]
    assert a["throughput"]["p10"] < a["throughput"]["p90"]  # a real spread
    assert abs(c["throughput"]["p50"] - a["throughput"]["p50"]) <= 20  # stable to one searched step


def test_zero_ranges_give_a_point():
    s = u.sample(FAST, SLOW, inputs(0.0), n=50, seed=1, good=u.Goodput(1e12))
    for kind in ("throughput", "goodput"):
        d = s[kind]
        assert d["p10"] == d["p50"] == d["p90"] == d["point"] is not None
        assert all(r["at_low"] == r["at_high"] == d["point"] for r in d["tornado"])
    # by hand: fast 1000 / 1.1 = 909.1 tokens/s; slow n: 15 n / 4.4, >= 909.1 from n = 266.7: the
    # first searched count (every 20 from 100) is 280
    assert s["throughput"]["point"] == 280
    assert s["goodput"]["point"] >= s["throughput"]["point"]


def test_tornado_puts_the_input_that_moves_it_most_first():
    s = u.sample(FAST, SLOW, inputs(0.2), n=10, seed=0)
    rows = s["throughput"]["tornado"]
    swings = [abs((r["at_high"] or 10**6) - (r["at_low"] or 10**6)) for r in rows]
    assert swings == sorted(swings, reverse=True) and swings[0] > 0
    assert {r["name"] for r in rows if r["at_low"] == r["at_high"]} >= {"slow_rate", "fast_rate"}  # throughput


def test_an_unordered_range_is_refused():
    with pytest.raises(ValueError, match="ordered range"):
        u.Input("x", "x", 1.0, 0.5, 2.0, "test")


def test_summary_sections_label_the_range_and_the_tornado():
    from relay.launch import fullscale_risk

    run = {"workload": "w", "uncertainty": {**u.sample(FAST, SLOW, inputs(0.2), n=200, seed=3,
                                                      good=u.Goodput(1e12)), "prepare_s": 1.0}}
    md = "\n".join(fullscale_risk.summary_md({"workloads": [run]}))
    t = run["uncertainty"]["throughput"]
    assert "## The answer as a range (emulated)" in md and "10th-90th percentile" in md
    assert f"| w | throughput | {t['point']} | **{t['p50']}** | {t['p10']}-{t['p90']} |" in md
    assert md.count("| w | ") == 2 + len(inputs(0.2))  # two break-evens, one tornado row per input


def test_bad_flags_are_refused_before_any_search():
    from types import SimpleNamespace

    from relay.errors import ConfigError
    from relay.launch import fullscale_risk

    with pytest.raises(ConfigError, match="--uncertainty = -5"):
        fullscale_risk.check(SimpleNamespace(uncertainty=-5, routing=None))
    with pytest.raises(ConfigError, match="--routing"):
        fullscale_risk.check(SimpleNamespace(uncertainty=10, routing="zipf:?"))
