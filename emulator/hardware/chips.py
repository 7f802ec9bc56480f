"""The chip catalog: sourced figures for every accelerator Relay can emulate.

    >>> from relay import chips
    >>> chips.get("h100").peak_flops("bf16")   # FLOP/s
    989400000000000.0

Figures live in catalog.toml (human units, one source per figure); this module turns them into
frozen `Chip` objects and checks them. Code reads SI units through the properties (`hbm_Bps`,
`peak_flops()`), never the catalog's TFLOPS or GB/s directly.
"""

from __future__ import annotations

import difflib
import math

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from relay.errors import ConfigError

CATALOG = Path(__file__).with_name("catalog.toml")

# Default efficiencies of the cost model (kernels/cost.py), overridable per chip and per run.
# MATMUL_EFF: the fraction of dense peak a large GEMM reaches (cuBLAS-class kernels reach 0.7-0.8);
# whole-job MFU of 38-47% (published large-scale training runs) then emerges from small ops and
# communication.
MATMUL_EFF = 0.7
MEM_EFF = 0.8  # fraction of HBM bandwidth a streaming kernel reaches
LAUNCH_US = 4.0  # fixed cost per kernel (launch + tail), us

# the attention implementations a chip's `attention` table may name: kernels/attention.py's IMPLEMENTATIONS
# (the layers keep kernels and hardware apart; tests/unit/test_attention_kernels.py holds the two equal)
ATTENTION_TABLES = ("sdpa", "cudnn")
FIGURES = ("bf16_tflops", "fp8_tflops", "hbm_gb", "hbm_tbps", "scaleup_gbps", "scaleup_latency_us",
           "scaleout_gbps", "scaleout_latency_us", "power_w")
# figures that may be absent from a data sheet, and the word the catalog uses for that
MAYBE = {"fp8_tflops": "none", "scaleout_gbps": "unknown", "power_w": "unknown"}
OPTIONAL = ("int8_tops", "mamf_tflops", "fp8_mamf_tflops")  # figures a chip may leave out (None), sourced where given
DTYPE_PEAK = {"bf16": "bf16_tflops", "fp16": "bf16_tflops", "fp8": "fp8_tflops", "int8": "int8_tops"}


@dataclass(frozen=True)
class Chip:
    name: str  # catalog key, e.g. "ascend-910c"
    bf16_tflops: float  # dense BF16 (and FP16) peak, 1e12 FLOP/s
    hbm_gb: float  # HBM capacity, 1e9 bytes
    hbm_tbps: float  # HBM bandwidth, 1e12 bytes/s
    scaleup_gbps: float  # scale-up link bandwidth per device, per direction, 1e9 bytes/s
    scaleup_latency_us: float  # per-message latency inside a scale-up domain, us
    scaleout_latency_us: float  # per-message latency across domains, us
    fp8_tflops: float | None = None  # dense FP8 peak; None: no FP8
    int8_tops: float | None = None  # dense INT8 peak, 1e12 op/s (W8A8 serving); None: none in the catalog
    # the fastest GEMM measured (the "maximum achievable matmul FLOPS" sweep's best shape), BF16 and FP8,
    # 1e12 FLOP/s: matmul_eff and fp8_matmul_eff are set from them, and no GEMM is charged faster (gemm_cap)
    mamf_tflops: float | None = None
    fp8_mamf_tflops: float | None = None
    scaleout_gbps: float | None = None  # scale-out bandwidth per device, per direction; None: unknown
    power_w: float | None = None  # power per device, W; None: unknown
    display: str = ""  # name as vendors write it
    vendor: str = ""
    matmul_eff: float = MATMUL_EFF  # see the module constants
    fp8_matmul_eff: float | None = None  # fraction of the FP8 peak a large FP8 GEMM reaches; None: matmul_eff
    mem_eff: float = MEM_EFF
    launch_us: float = LAUNCH_US
    compute_units: int | None = None  # SMs / CUs / cores a GEMM's tiles are spread over (wave quantisation)
    scaleup_fabric: str | None = None  # link class in fabrics.toml; None: the default class
    scaleout_fabric: str | None = None
    estimates: tuple[str, ...] = ()  # figures that are estimates or disputed
    sources: dict = field(default_factory=dict, compare=False)  # figure -> where it comes from
    # attention implementation -> [forward, backward, causal forward, causal backward]: the fraction of
    # the dense BF16 peak its fused kernel reaches in the FLOPs it executes (kernels/attention.py)
    attention: dict = field(default_factory=dict, compare=False)
    note: str = ""

    def __post_init__(self):
        for f in FIGURES + ("matmul_eff", "mem_eff", "launch_us"):
            v = getattr(self, f)
            if v is None and f in MAYBE:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                if f == "launch_us" and v == 0:
                    continue
                allowed = f' (or "{MAYBE[f]}")' if f in MAYBE else ""
                raise ConfigError(f"chip {self.name!r}: {f} = {v!r} is invalid; "
                                 f"give a positive number{allowed}")
        for f, absent in (("int8_tops", "the chip serves no INT8"), ("mamf_tflops", "no GEMM cap"),
                          ("fp8_mamf_tflops", "no FP8 GEMM cap")):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v <= 0):
                raise ConfigError(f"chip {self.name!r}: {f} = {v!r} is invalid; give a positive number, or leave "
                                 f"it out (then {absent})")
        if self.fp8_mamf_tflops is not None and self.fp8_tflops is None:
            raise ConfigError(f"chip {self.name!r}: fp8_mamf_tflops = {self.fp8_mamf_tflops!r} is given, but the chip "
                             "has no FP8 (fp8_tflops \"none\"); leave it out, or give fp8_tflops")
        v = self.fp8_matmul_eff
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1):
            raise ConfigError(f"chip {self.name!r}: fp8_matmul_eff = {v!r} is invalid; give a fraction of "
                             "the FP8 peak in (0, 1], or leave it out (then matmul_eff)")
        for f in ("matmul_eff", "mem_eff"):
            if getattr(self, f) > 1:
                raise ConfigError(f"chip {self.name!r}: {f} = {getattr(self, f)!r} is above 1; "
                                 "an efficiency is a fraction of peak in (0, 1]")
        for impl, effs in self.attention.items():
            if impl not in ATTENTION_TABLES:  # a misspelt name would leave its implementation at the GEMM rule
                raise ConfigError(f"chip {self.name!r}: attention.{impl} is not an attention implementation; "
                                 f"give one of {', '.join(ATTENTION_TABLES)}")
            if not isinstance(effs, list) or len(effs) != 4 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in effs):
                raise ConfigError(f"chip {self.name!r}: attention.{impl} = {effs!r} is invalid; give four fractions "
                                 "of the BF16 peak in (0, 1]: forward, backward, causal forward, causal backward")
        for f in self.estimates:
            if f not in FIGURES + OPTIONAL:
                raise ConfigError(f"chip {self.name!r}: estimates lists {f!r}, which is not a figure; "
                                 f"figures are {', '.join(FIGURES + OPTIONAL)}")

    # -- SI views (the only way code should read figures) --
    def peak_flops(self, dtype: str = "bf16") -> float:
        """Dense peak in FLOP/s (op/s for "int8") for an emulated dtype ("bf16", "fp16", "fp8", "int8")."""
        if dtype not in DTYPE_PEAK:
            raise ConfigError(f"dtype = {dtype!r} is not an emulated dtype; choose one of "
                             f"{', '.join(DTYPE_PEAK)}")
        tflops = getattr(self, DTYPE_PEAK[dtype])
        if tflops is None:
            with_it = ", ".join(c.name for c in _CATALOG.values() if getattr(c, DTYPE_PEAK[dtype]) is not None)
            said = f'is "{MAYBE[DTYPE_PEAK[dtype]]}"' if DTYPE_PEAK[dtype] in MAYBE else "is absent"
            raise ConfigError(f"precision = {dtype!r}: chip {self.name!r} has no {dtype} peak (its catalog "
                             f"{DTYPE_PEAK[dtype]} {said}); emulate precision 'bf16' on it, or "
                             f"choose a chip with {dtype} ({with_it})")
        return tflops * 1e12

    @property
    def fp8_eff(self) -> float:
        """Fraction of the FP8 peak a large FP8 GEMM reaches (the catalog's, else matmul_eff)."""
        return self.matmul_eff if self.fp8_matmul_eff is None else self.fp8_matmul_eff

    def gemm_cap(self, fp8: bool = False) -> float:
        """The most of its efficiency (matmul_eff x peak, or the FP8 ones) a GEMM is charged at, in (0, 1]:
        the MAMF sweep's fastest GEMM over that rate. matmul_eff is set from the sweep's best shape
        after its tile and wave quantisation and its launch (kernels/gemm.py), so a long GEMM with no
        quantisation loss would otherwise run faster than any GEMM the sweep measured (on an H100 843
        TFLOPS, of a measured best of 794.5). 1 where the catalog gives no MAMF."""
        share = self._mamf_share(fp8)
        return 1.0 if share is None else min(1.0, share)

    def _mamf_share(self, fp8: bool) -> float | None:
        mamf, peak, eff = ((self.fp8_mamf_tflops, self.fp8_tflops, self.fp8_eff) if fp8
                           else (self.mamf_tflops, self.bf16_tflops, self.matmul_eff))
        return None if mamf is None or peak is None else mamf / (peak * eff)

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gb * 1e9

    @property
    def hbm_Bps(self) -> float:
        return self.hbm_tbps * 1e12

    def is_estimate(self, figure: str) -> bool:
        return figure in self.estimates

    def replace(self, **changes) -> Chip:
        """A copy with some fields changed (validated again), e.g. chip.replace(matmul_eff=0.5). The
        fastest GEMMs measured (mamf_tflops, fp8_mamf_tflops) move with the peak and efficiency they
        were measured at unless given, so the GEMM cap stays the same share of the rate (gemm_cap)."""
        if "fp8_tflops" in changes and changes["fp8_tflops"] is None:  # no FP8: no FP8 GEMM measured either
            changes = {"fp8_mamf_tflops": None, **changes}
        out = replace(self, **changes)
        kept = {}
        for fp8, f in ((False, "mamf_tflops"), (True, "fp8_mamf_tflops")):
            share = self._mamf_share(fp8)
            if f not in changes and share is not None:
                kept[f] = share * (out.fp8_tflops * out.fp8_eff if fp8 else out.bf16_tflops * out.matmul_eff)
        return replace(out, **kept) if kept else out

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _parse(name: str, raw: dict) -> Chip:
    raw = dict(raw)
    kw = {"name": name}
    for f in FIGURES:
        if f not in raw:
            raise ConfigError(f"chip {name!r}: figure {f} is missing from the catalog; add it "
                             f"(a positive number{' or ' + repr(MAYBE[f]) if f in MAYBE else ''})")
        v = raw.pop(f)
        if f in MAYBE and v == MAYBE[f]:
            v = None
        kw[f] = v
    sources = raw.pop("sources", {})
    kw.update({f: raw.pop(f) for f in OPTIONAL if f in raw})
    missing = [f for f in FIGURES + OPTIONAL if kw.get(f) is not None and f not in sources]
    if missing:
        raise ConfigError(f"chip {name!r}: no source for {', '.join(missing)}; "
                         f"add them under [{name}.sources]")
    kw["sources"] = sources
    kw["estimates"] = tuple(raw.pop("estimates", ()))
    allowed = {"display", "vendor", "note", "matmul_eff", "fp8_matmul_eff", "mem_eff", "launch_us", "compute_units",
               "scaleup_fabric", "scaleout_fabric", "attention"}
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"chip {name!r}: unknown field(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(FIGURES + OPTIONAL + tuple(sorted(allowed)))}")
    kw.update(raw)
    return Chip(**kw)


def load(path: Path | str = CATALOG) -> dict[str, Chip]:
    """Parse and validate a catalog file; returns {name: Chip}."""
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    return {name: _parse(name, raw) for name, raw in data.items()}


_CATALOG: dict[str, Chip] = load()
ALIASES = {"910b": "ascend-910b", "910c": "ascend-910c", "gb200": "b200", "h100-sxm": "h100"}


def names() -> list[str]:
    return list(_CATALOG)


def get(name: str | Chip) -> Chip:
    """The catalog chip called `name` (case-insensitive); a Chip passes through."""
    if isinstance(name, Chip):
        return name
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key in _CATALOG:
        return _CATALOG[key]
    close = difflib.get_close_matches(key, _CATALOG, n=3, cutoff=0.5)
    close += [n for n in _CATALOG if key and key in n and n not in close]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"chip = {name!r} is not in the catalog; {hint}known chips: {', '.join(_CATALOG)}")


def register(chip: Chip) -> Chip:
    """Add a user-defined chip to the catalog for this process (and name it in configs)."""
    _CATALOG[chip.name] = chip
    return chip
