"""The published-measurements table and the regression guard on Relay's validated figures."""

import statistics

import pytest

from relay.errors import ConfigError
from relay.launch import validate
from relay.launch.validate import REGRESSION_TOL, load, relay_figure

ROWS = load()


def test_the_table_is_complete_and_checkable():
    assert len(ROWS) >= 30
    chips = {r.chip for r in ROWS}
    assert {"a100", "mi300x"} <= chips and chips & {"h100", "h200"} and chips & {"b200", "b200-hgx"}
    for r in ROWS:
        assert r.source and r.published > 0, r.id
        assert (r.metric, r.unit) in {("busbw", "GB/s"), ("time", "us"), ("tflops", "TFLOPS")}, r.id
        assert (r.kind == "matmul") == bool(r.shape) and (r.kind == "matmul") != bool(r.size), r.id
        assert r.relay > 0, f"{r.id}: no expected Relay figure; run `relay validate --update`"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_no_validated_figure_moves_without_the_table(row):
    """A change that moves Relay's figure for a published row by more than REGRESSION_TOL must
    update the table's `relay` column in the same change (`relay validate --update`), so that
    the move is visible in review next to the published figure."""
    got, _ = relay_figure(row)
    assert got == pytest.approx(row.relay, rel=REGRESSION_TOL), (
        f"{row.id}: Relay now gives {got:.4g} {row.unit} (table: {row.relay:.4g}, published "
        f"{row.published:g}); if the model change is meant, run `relay validate --update`")


def test_the_fp8_gemm_rows_time_a_scaled_mm_and_a_bad_precision_is_refused(tmp_path):
    """An FP8 row is costed as the torch._scaled_mm the MAMF finder times (no casts), at the chip's
    FP8 peak x fp8_matmul_eff; a precision that is not "bf16" or, on a matmul row, "fp8" is refused
    naming the row, the field and the value."""
    row = next(r for r in ROWS if r.id == "h100-fp8-gemm-best")
    assert row.precision == "fp8" and row.fit
    fp8, _ = relay_figure(row)
    bf16, _ = relay_figure(next(r for r in ROWS if r.id == "h100-gemm-best"))
    assert fp8 == pytest.approx(row.published, rel=1e-3) and fp8 > 1.7 * bf16
    text = validate.PUBLISHED.read_text()
    path = tmp_path / "t.toml"
    for old, new in (('precision = "fp8"', 'precision = "FP8"'),  # a misspelt precision; fp8 on a collective row
                     ('kind = "all_reduce"', 'kind = "all_reduce"\nprecision = "fp8"')):
        path.write_text(text.replace(old, new, 1))
        with pytest.raises(ConfigError, match=r"row '.+': precision = '(FP8|fp8)' is invalid; give \"bf16\""):
            load(path)


def test_summary_and_verdict():
    results = [{"row": ROWS[0], "relay": 1.0, "ran": "", "ratio": r, "err": abs(r - 1)} for r in (1.05, 0.95, 1.5)]
    s = validate.summary(results)
    assert s["median_abs_err"] == pytest.approx(0.05) and s["worst_abs_err"] == pytest.approx(0.5)
    ok, line = validate.verdict(s)
    assert not ok and line.startswith("MISS") and "1 row(s) beyond 30%" in line
    ok, _ = validate.verdict(validate.summary(results[:2]))
    assert ok


def test_update_rewrites_only_the_relay_column(tmp_path):
    path = tmp_path / "t.toml"
    text = validate.PUBLISHED.read_text()
    path.write_text(text)
    results = [{"row": r, "relay": 123.456789} for r in ROWS[:2]]
    validate.update(path, results)
    rows = load(path)
    assert [r.relay for r in rows[:2]] == [123.5, 123.5]
    assert [r.relay for r in rows[2:]] == [r.relay for r in ROWS[2:]]
    assert [r.published for r in rows] == [r.published for r in ROWS]


def test_the_verdict_takes_the_median_of_the_rows_not_used_for_fitting():
    """Fit rows agree by construction; counting them would pass a model whose held-out rows miss."""
    fit, held = [r for r in ROWS if r.fit][:3], [r for r in ROWS if not r.fit][:2]
    results = [{"row": r, "err": 0.0} for r in fit] + [{"row": r, "err": e} for r, e in zip(held, (0.08, 0.14))]
    s = validate.summary(results)
    assert s["median_abs_err"] == pytest.approx(0.11) and s["held_out"] == 2
    assert s["median_abs_err_with_fit"] == 0.0
    ok, line = validate.verdict(s)
    assert not ok and "median |error| 11.0% over the 2 rows not used for fitting" in line


def test_the_readme_quotes_the_tables_row_count_and_held_out_median():
    """From the table's relay column (within REGRESSION_TOL of today's figures, checked above)."""
    from pathlib import Path
    held = [abs(r.relay / r.published - 1) for r in ROWS if not r.fit]
    readme = (Path(validate.__file__).resolve().parents[1] / "README.md").read_text()
    assert (f"Relay against {len(ROWS)} published measurements (median |error| "
            f"{statistics.median(held):.1%} on the {len(held)} not fit)") in readme
