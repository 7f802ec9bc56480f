"""Goodput at scale (emulator/analytic/goodput.py): Young's and Daly's checkpoint intervals and
Daly's expected wall time, against figures worked by hand from the formulas."""

import math

import pytest

from relay.analytic import goodput as gp
from relay.errors import ConfigError


def test_young_and_daly_intervals_by_hand():
    # M = 10 h, C = 0.1 h: Young sqrt(2 x 0.1 x 10) = sqrt(2) h; Daly with x = C / 2M = 0.005:
    # sqrt(2) (1 + sqrt(0.005) / 3 + 0.005 / 9) - 0.1 = 1.414214 x 1.024126 - 0.1 = 1.348332 h
    assert gp.young(0.1, 10.0) == pytest.approx(1.414214, rel=1e-6)
    assert gp.daly(0.1, 10.0) == pytest.approx(1.348332, rel=1e-6)
    assert gp.daly(30.0, 10.0) == 10.0  # C >= 2M: checkpoint every M


def test_useful_fraction_by_hand_and_daly_interval_is_near_the_optimum():
    # tau = 1.348332, C = 0.1, R = 0, M = 10: 1.348332 / (10 (e^0.1448332 - 1)) = 1.348332 / 1.558482
    assert gp.useful_fraction(1.348332, 0.1, 0.0, 10.0) == pytest.approx(0.865157, rel=1e-5)
    # a restart of R = 0.5 h divides it by e^(R / M) = e^0.05
    assert gp.useful_fraction(1.348332, 0.1, 0.5, 10.0) == pytest.approx(0.865157 / math.exp(0.05), rel=1e-5)
    best = max(gp.useful_fraction(t / 1000, 0.1, 0.5, 10.0) for t in range(200, 5000))
    assert gp.useful_fraction(gp.daly(0.1, 10.0), 0.1, 0.5, 10.0) == pytest.approx(best, rel=1e-4)
    assert gp.useful_fraction(gp.young(0.1, 10.0), 0.1, 0.5, 10.0) <= best


def test_goodput_of_a_job_by_hand():
    # 1,000 devices at 1e-4 interruptions per device-hour: M = 10 h; 720 TB of state at 2,000 GB/s
    # is C = 360 s = 0.1 h; R = 600 s + 360 s reading it back = 960 s
    g = gp.goodput(1000, 1e-4, 720e12, storage_gbps=2000.0, restart_s=600.0)
    assert g.mtbf_h == pytest.approx(10.0) and g.checkpoint_s == pytest.approx(360.0)
    assert g.restart_s == pytest.approx(960.0)
    assert g.interval_s == pytest.approx(1.348332 * 3600, rel=1e-6)
    assert g.fraction == pytest.approx(0.865157 / math.exp(960 / 36000), rel=1e-5)
    # twice the devices: half the MTBF, less goodput; no failures: only the checkpoints cost
    assert gp.goodput(2000, 1e-4, 720e12).fraction < g.fraction
    assert gp.goodput(1000, 0.0, 720e12).fraction == 1.0


def test_llama3_anchor_is_the_papers_count():
    # 419 unexpected interruptions in 54 days on 16,384 H100: one every 3.09 hours for the job
    r = gp.rate("h100")
    assert 1 / (16384 * r.per_device_hour) == pytest.approx(54 * 24 / 419, rel=1e-3)
    assert "Table 5" in r.source
    for chip, row in gp.rates().items():
        assert row.low <= row.per_device_hour <= row.high, chip


def test_bad_input_names_the_field():
    with pytest.raises(ConfigError, match="storage_gbps"):
        gp.goodput(8, 1e-5, 1e12, storage_gbps=0)
    with pytest.raises(ConfigError, match="no interruption rate"):
        gp.rate("tpu-v9")


def test_llama3_405b_on_16k_h100_loses_about_what_the_paper_reports():
    # at the anchor's own scale the model should land near the paper's "more than 90% effective
    # training time": M = 3.09 h, 405B x 14 bytes = 5.67 TB at 2 TB/s = 2.8 s, 10 min restarts
    g = gp.goodput(16384, gp.rate("h100").per_device_hour, gp.state_bytes(405e9))
    assert g.mtbf_h == pytest.approx(3.09, rel=0.01) and g.checkpoint_s == pytest.approx(2.835, rel=0.01)
    assert 0.90 < g.fraction < 0.95
