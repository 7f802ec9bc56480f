"""summary.md from a summary.json (launch/summary.py): every figure labelled by where it comes from,
published comparisons only for the pair they describe, the sensitivity table, the search's checks."""

from relay import System, TrainConfig
from relay.launch.summary import summary_md
from relay.results.folder import system_dict

SETTINGS = TrainConfig(workload="gpt-tiny", steps=4, per_device_batch=8, batch_scale=1024)


def point(chip, devices, step_s, predicted=False):
    return {"chip": chip, "devices": devices, "step_s": step_s, "exposed_comm_s": 1e-5, "mfu": 0.03,
            "predicted": predicted}


def summary(fast: System, slow: System, full=True, sens=True) -> dict:
    row = {"algorithm": "ring", "metric": "throughput", "break_even_devices": 20, "predicted": False,
           "naive_devices": 29.9, "scaling_efficiency": 0.99, "fast_energy_per_unit_j": 2e-5,
           "slow_energy_per_unit_j": 3e-5, "energy_unit": "token", "below_devices": 19, "below_value": 1.1e6,
           "verified": True, "non_monotone": [[12, 13]], "fast_power_basis": fast.power_basis,
           "slow_power_basis": slow.power_basis}
    out = {"name": "x", "fast": system_dict(fast), "slow": system_dict(slow), "breakeven": [row],
           "points": [point(fast.chip.name, 1, 0.007), point(slow.chip.name, 1, 0.015)]}
    if full:
        side = lambda s, t: {"system": s.name, "devices": s.devices, "from_devices": 9, "algorithm": "ring",  # noqa: E731
                             "throughput": t, "step_s": 0.01, "exposed_comm_s": 1e-3, "comm_s": 2e-3,
                             "energy_per_unit_j": 3e-5, "power_basis": s.power_basis}
        out["full_scale"] = {"fast": side(System.preset(fast.name), 1e7), "slow": side(System.preset(slow.name), 2e7)}
    if sens:
        out["sensitivity"] = {"algorithm": "ring", "base_devices": 20, "side": "slow", "host_s": 61.0, "rows": [
            {"parameter": "launch_us", "low": 0.5, "high": 2.0, "scales": True, "why": "because", "catalog": 4.0,
             "side": "both",
             "low_devices": 18, "high_devices": 25, "low_predicted": False, "high_predicted": True,
             "low_verified": True, "high_verified": True},
            {"parameter": "link_eff", "low": 0.6, "high": 1.25, "scales": True, "why": "fabric", "catalog": None,
             "side": "slow", "low_devices": 21, "high_devices": 20, "low_predicted": False,
             "high_predicted": False, "low_verified": True, "high_verified": True}]}
    return out


def test_headline_summary_labels_predictions_and_shows_the_published_pair():
    md = summary_md(summary(System.preset("nvl72").scaled(9), System.preset("cloudmatrix384")), SETTINGS)
    assert "measured" not in md and "scaled linearly" not in md
    assert "## Full systems (predicted)" in md and "| throughput on this workload | 2.00x | predicted |" in md
    assert "SemiAnalysis" in md and "780" in md  # the published comparison of this pair
    assert "power (system (all-in))" in md and "power basis: fast system (all-in), slow system (all-in)" in md
    assert "## Sensitivity" in md and "| launch_us | both sides | 4 | x0.5 (2) | 18 | x2 (8) | 25 (predicted) |" in md
    assert "| link_eff | slow side | 1 (the calibrated fabric) | x0.6 | 21 | x1.25 | 20 |" in md
    assert "took 61 s of host time" in md
    assert "19: 1.1e+06, falls short" in md and "**Not monotone (ring).** More slow devices did worse at 12 -> 13" in md
    assert "launch_us: 4 us on both chips" in md


def test_published_comparison_only_for_its_pair():
    md = summary_md(summary(System.preset("hgx-h100"), System.preset("dgx-a100"), full=False, sens=False),
                    SETTINGS)
    assert "SemiAnalysis" not in md and "780" not in md
    assert "power (chip)" in md  # chip power on both sides, said so


def test_sensitivity_varies_one_figure():
    from relay.driver.sensitivity import RANGES, vary
    slow = System.preset("cloudmatrix384")
    by = {r.parameter: r for r in RANGES}
    assert vary(slow, by["launch_us"], 2.0).chip.launch_us == 2 * slow.chip.launch_us
    assert vary(slow, by["matmul_eff"], 0.5).chip.matmul_eff == 0.5
    linked = vary(slow, by["link_eff"], 0.5)
    assert (linked.scaleup_gbps, linked.scaleout_gbps) == (slow.scaleup_gbps / 2, slow.scaleout_gbps / 2)
    assert linked.chip == slow.chip and vary(slow, by["mem_eff"], 0.6).scaleup_gbps == slow.scaleup_gbps
    assert by["launch_us"].both and not any(r.both for r in RANGES if r.parameter != "launch_us")
