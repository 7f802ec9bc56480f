import pytest

from relay import chips
from relay.hardware.chips import FIGURES, Chip

SPEC_CHIPS = ["ascend-910b", "ascend-910c", "a100", "h100", "h200", "b200", "b200-hgx", "mi300x",
              "tpu-v5p", "tpu-v5e"]


def test_catalog_has_every_chip_of_specs():
    assert set(SPEC_CHIPS) <= set(chips.names())


@pytest.mark.parametrize("name", SPEC_CHIPS)
def test_every_known_figure_has_a_source(name):
    chip = chips.get(name)
    for f in FIGURES:
        if getattr(chip, f) is not None:
            assert chip.sources.get(f), f"{name}.{f} has no source"


def test_figures_match_specs_and_units():
    h100 = chips.get("h100")
    assert h100.peak_flops("bf16") == 989.4e12
    assert h100.peak_flops("fp8") == 1978.9e12
    assert h100.hbm_Bps == 3.35e12 and h100.hbm_bytes == 80e9
    c = chips.get("ascend-910c")
    assert c.bf16_tflops == 752 and "780" in c.sources["bf16_tflops"]  # first-named source kept
    assert c.is_estimate("power_w") and not c.is_estimate("bf16_tflops")
    assert chips.get("ascend-910b").is_estimate("bf16_tflops")
    assert chips.get("b200").hbm_gb == 186 and chips.get("b200-hgx").power_w == 1000
    assert chips.get("tpu-v5p").power_w is None  # unknown, not invented
    assert chips.get("tpu-v5p").fp8_tflops is None  # Google publishes int8 (918), no FP8 rate


def test_chip_power_is_chip_level():
    # every chip's power is the chip alone (all-in rack power belongs to the system presets);
    # where the vendor publishes none it is an estimate with its reasoning in the source
    for name in chips.names():
        c = chips.get(name)
        if c.power_w is not None:
            assert "all-in" not in c.sources["power_w"].split("System all-in")[0], name
    c = chips.get("ascend-910c")
    assert c.power_w == 800 and c.is_estimate("power_w") and "two 910B-class dies" in c.sources["power_w"]


def test_no_fp8_is_refused_clearly():
    with pytest.raises(ValueError, match="no fp8 peak"):
        chips.get("a100").peak_flops("fp8")


def test_unknown_chip_lists_close_matches():
    with pytest.raises(ValueError) as e:
        chips.get("h1000")
    assert "h100" in str(e.value) and "known chips" in str(e.value)
    with pytest.raises(ValueError, match="ascend-910c"):
        chips.get("ascend-910x")
    assert chips.get("910c") is chips.get("ascend-910c")  # short names of the Ascend chips


def test_get_is_case_insensitive_and_passes_chips_through():
    assert chips.get("H100") is chips.get("h100")
    assert chips.get(chips.get("a100")).name == "a100"


GOOD = """
[toy]
bf16_tflops = 100
fp8_tflops = "none"
hbm_gb = 10
hbm_tbps = 1
scaleup_gbps = 100
scaleup_latency_us = 2
scaleout_gbps = "unknown"
scaleout_latency_us = 5
power_w = 300
[toy.sources]
bf16_tflops = "s"
hbm_gb = "s"
hbm_tbps = "s"
scaleup_gbps = "s"
scaleup_latency_us = "s"
scaleout_latency_us = "s"
power_w = "s"
"""


def _load(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return chips.load(p)


def test_a_good_catalog_loads(tmp_path):
    toy = _load(tmp_path, GOOD)["toy"]
    assert toy.fp8_tflops is None and toy.scaleout_gbps is None and toy.power_w == 300


@pytest.mark.parametrize("bad,match", [
    (("hbm_gb = 10", "hbm_gb = 0"), r"chip 'toy': hbm_gb = 0 is invalid; give a positive number"),
    (("hbm_tbps = 1", "hbm_tbps = -1"), r"hbm_tbps = -1"),
    (("power_w = 300", 'power_w = "lots"'), r"power_w = 'lots' is invalid.*\"unknown\""),
    (("scaleup_gbps = 100\n", ""), r"chip 'toy': figure scaleup_gbps is missing"),
    (('power_w = "s"\n', ""), r"no source for power_w"),
    (("[toy.sources]", 'colour = "red"\n[toy.sources]'), r"unknown field\(s\) colour"),
    (("[toy.sources]", 'mamf_tflops = 0\n[toy.sources]\nmamf_tflops = "s"'),
     r"chip 'toy': mamf_tflops = 0 is invalid; give a positive number, or leave it out \(then no GEMM cap\)"),
    (("[toy.sources]", 'mamf_tflops = 100\n[toy.sources]'), r"no source for mamf_tflops"),
])
def test_bad_catalog_entries_name_chip_field_and_value(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        _load(tmp_path, GOOD.replace(*bad))


def test_efficiency_must_be_a_fraction():
    with pytest.raises(ValueError, match="matmul_eff = 1.5 is above 1"):
        chips.get("h100").replace(matmul_eff=1.5)
    assert isinstance(chips.get("h100").replace(matmul_eff=0.5), Chip)
