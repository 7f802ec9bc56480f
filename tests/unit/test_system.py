import pytest

from relay import System, chips


def test_constructor_resolves_links_from_the_chip():
    s = System("h100", 16, domain=8)
    assert s.chip is chips.get("h100")
    assert (s.scaleup_gbps, s.scaleup_latency_us) == (450, 2.5)
    assert (s.scaleout_gbps, s.scaleout_latency_us) == (50, 5.0)
    assert s.domains == 2 and s.domain_sizes == [8, 8]
    assert s.scaleup.Bps == 450e9 and s.scaleout.latency_s == 5e-6
    assert s.link(0, 7) == s.scaleup and s.link(7, 8) == s.scaleout


def test_overrides_and_one_domain_default():
    s = System("a100", 4, scaleup_gbps=10, scaleup_latency_us=1, scaleout_gbps=1, scaleout_latency_us=9)
    assert s.domain == 4 and s.domains == 1
    assert (s.scaleup_gbps, s.scaleup_latency_us, s.scaleout_gbps, s.scaleout_latency_us) == (10, 1, 1, 9)


def test_remainder_rule_is_explicit():
    s = System("h100", 10, domain=4)
    assert s.domain_sizes == [4, 4, 2] and s.domain_of(9) == 2


@pytest.mark.parametrize("name,chip,devices,domain", [
    ("nvl72", "b200", 72, 72), ("cloudmatrix384", "ascend-910c", 384, 384), ("hgx-h100", "h100", 8, 8),
    ("dgx-a100", "a100", 8, 8), ("ascend-910b-x8", "ascend-910b", 8, 8), ("mi300x-x8", "mi300x", 8, 8)])
def test_presets(name, chip, devices, domain):
    s = System.preset(name)
    assert (s.chip.name, s.devices, s.domain, s.name) == (chip, devices, domain, name)


def test_preset_power_is_all_in_system_power():
    assert System.preset("nvl72").power_w == pytest.approx(145e3 / 72)
    assert System.preset("cloudmatrix384").power_w == pytest.approx(559e3 / 384)
    assert System.preset("hgx-h100").power_w == 700


def test_scaled_keeps_chip_and_fabric():
    nvl = System.preset("nvl72")
    assert nvl.scaled(9).domain == 9 and nvl.scaled(9).domains == 1
    assert nvl.scaled(144).domain_sizes == [72, 72]
    hgx = System.preset("hgx-h100").scaled(32)
    assert (hgx.devices, hgx.domain, hgx.chip.name, hgx.power_w) == (32, 8, "h100", 700)
    assert System("h100", 8, scaleup_gbps=7).scaled(4).scaleup_gbps == 7


@pytest.mark.parametrize("kwargs,match", [
    (dict(chip="h100", devices=0), r"devices = 0 is invalid; give an integer >= 1"),
    (dict(chip="h100", devices=2.5), r"devices = 2.5"),
    (dict(chip="h100", devices=4, domain=8), r"domain = 8 is larger than devices = 4"),
    (dict(chip="h100", devices=4, domain=0), r"domain = 0 is invalid"),
    (dict(chip="h100", devices=4, scaleup_gbps=-1), r"scaleup_gbps = -1 is invalid"),
    (dict(chip="h100", devices=4, scaleout_latency_us=0), r"scaleout_latency_us = 0"),
    (dict(chip="ascend-910b", devices=16, domain=8), r"scaleout_gbps is unknown .* pass scaleout_gbps"),
    (dict(chip="nope", devices=4), r"chip = 'nope' is not in the catalog"),
])
def test_bad_systems_are_rejected_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        System(**kwargs)


def test_unknown_preset_lists_close_matches():
    with pytest.raises(ValueError, match="did you mean nvl72"):
        System.preset("nvl73")


def test_power_basis_separates_chip_power_from_all_in_system_power():
    # presets carry all-in rack power per device; a bare chip system, the chip's own figure
    assert System.preset("nvl72").power_basis == "system (all-in)"
    assert System.preset("cloudmatrix384").power_basis == "system (all-in)"
    assert System.preset("cloudmatrix384").scaled(8).power_basis == "system (all-in)"
    assert System("ascend-910c", 8).power_basis == "chip" and System("h100", 8).power_basis == "chip"
    assert System.preset("hgx-h100").power_basis == "chip"
    assert System("h100", 8, power_w=1000).power_basis == "system (all-in)"
    assert System("h100", 8, power_w=700, power_basis="chip").power_basis == "chip"
    with pytest.raises(ValueError, match="power_basis = 'wall' is unknown"):
        System("h100", 8, power_basis="wall")
    # the 910C's catalog figure is chip-level (an estimate), not the rack's all-in share
    assert System("ascend-910c", 1).power_w < System.preset("cloudmatrix384").power_w
