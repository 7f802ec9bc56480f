"""Systems: a chip, a device count, scale-up domains, and the two link classes between devices.

Devices are numbered 0..devices-1; domain d holds devices [d*domain, (d+1)*domain). When `domain`
does not divide `devices`, the last domain holds the remainder (e.g. 10 devices, domain 4: domains
of 4, 4 and 2); algorithms that need equal domains (hierarchical) refuse such a system.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, replace

from relay.errors import ConfigError
from relay.hardware import chips
from relay.hardware.chips import Chip

# name -> (chip, devices, domain, power per device in W or None for the chip's, description, source).
# A preset's power is all-in (the rack: chips, host CPUs, switches, optics, cooling) divided by
# its devices; a chip's catalog power is the chip alone. System.power_basis says which one a
# system's energy figures use.
PRESETS = {
    "nvl72": ("b200", 72, 72, 145e3 / 72, "GB200 NVL72: 72 B200 in one NVLink 5 domain",
              "Nvidia GB200 NVL72 page; power 145 kW all-in (SemiAnalysis, est.)"),
    "cloudmatrix384": ("ascend-910c", 384, 384, 559e3 / 384,
                       "CloudMatrix 384: 384 Ascend 910C in one all-to-all UB domain",
                       "SemiAnalysis 2025-04-16; arXiv 2506.12708; power 559 kW all-in (est.)"),
    "hgx-h100": ("h100", 8, 8, None, "HGX H100: 8 H100 per NVLink 4 domain, NDR scale-out",
                 "Nvidia H100 datasheet"),
    "dgx-a100": ("a100", 8, 8, None, "DGX A100: 8 A100 per NVLink 3 domain, HDR scale-out",
                 "Nvidia A100 datasheet"),
    "ascend-910b-x8": ("ascend-910b", 8, 8, None, "8 Ascend 910B on HCCS", "see the chip's sources"),
    "mi300x-x8": ("mi300x", 8, 8, None, "8 MI300X on Infinity Fabric", "AMD MI300X datasheet"),
}


POWER_BASES = ("chip", "system (all-in)")


@dataclass(frozen=True)
class Link:
    latency_s: float  # per message
    Bps: float  # bytes per second, per direction, per device port

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.Bps


def _positive(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ConfigError(f"{owner}: {name} = {value!r} is invalid; give a positive number")


@dataclass(frozen=True)
class System:
    chip: Chip | str  # a Chip or a catalog name; resolved to a Chip
    devices: int  # number of emulated devices
    domain: int | None = None  # devices per scale-up domain; None: one domain of all devices
    scaleup_gbps: float | None = None  # per device, per direction, GB/s; None: the chip's
    scaleup_latency_us: float | None = None  # per message, us; None: the chip's
    scaleout_gbps: float | None = None
    scaleout_latency_us: float | None = None
    power_w: float | None = None  # per device, W (all-in for presets); None: the chip's
    name: str = ""  # preset name, or "" for a custom system
    note: str = field(default="", compare=False)
    device_chips: tuple = ()  # a mixed system: one chip per device (see System.mixed)
    link_model: str = "calibrated"  # "calibrated" (fabrics.toml) or "ideal" (line rate, no overheads)
    power_basis: str | None = None  # POWER_BASES: "system (all-in)" when power_w is given, else "chip"
    sharp: bool = False  # the scale-out switches reduce (InfiniBand SHARP, NCCL CollNet); off by default

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.device_chips:
            set_("device_chips", tuple(chips.get(c) for c in self.device_chips))
            set_("chip", self.device_chips[0])
        set_("chip", chips.get(self.chip))
        who = f"system {self.name or self.chip.name}"
        if self.link_model not in ("calibrated", "ideal"):
            raise ConfigError(f"{who}: link_model = {self.link_model!r} is unknown; choose 'calibrated' "
                             "(measured link efficiency and overheads) or 'ideal' (line rate)")
        if not isinstance(self.sharp, bool):
            raise ConfigError(f"{who}: sharp = {self.sharp!r} is invalid; give True (the scale-out switches "
                             "reduce, InfiniBand SHARP) or False")
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1:
            raise ConfigError(f"{who}: devices = {self.devices!r} is invalid; give an integer >= 1")
        if self.device_chips and len(self.device_chips) != self.devices:
            raise ConfigError(f"{who}: {len(self.device_chips)} device chips for devices = {self.devices}; "
                             "give one chip per device")
        if self.mixed_chips:  # a mixed fabric runs at the pace of its slowest member
            for f, pick in (("scaleup_gbps", min), ("scaleup_latency_us", max), ("scaleout_latency_us", max)):
                if getattr(self, f) is None:
                    set_(f, pick(getattr(c, f) for c in self.chips))
            if self.scaleout_gbps is None and all(c.scaleout_gbps for c in self.chips):
                set_("scaleout_gbps", min(c.scaleout_gbps for c in self.chips))
        if self.domain is None:
            set_("domain", self.devices)
        if isinstance(self.domain, bool) or not isinstance(self.domain, int) or self.domain < 1:
            raise ConfigError(f"{who}: domain = {self.domain!r} is invalid; give an integer >= 1 "
                             "(devices per scale-up domain) or None for one domain")
        if self.domain > self.devices:
            raise ConfigError(f"{who}: domain = {self.domain} is larger than devices = {self.devices}; "
                             f"give domain <= {self.devices}, or None for one domain of all devices")
        for f in ("scaleup_gbps", "scaleup_latency_us", "scaleout_latency_us"):
            if getattr(self, f) is None:
                set_(f, getattr(self.chip, f))
            _positive(who, f, getattr(self, f))
        if self.scaleout_gbps is None:
            set_("scaleout_gbps", self.chip.scaleout_gbps)
        if self.scaleout_gbps is None:
            if self.domains > 1:
                raise ConfigError(f"{who}: scaleout_gbps is unknown for chip {self.chip.name!r} and "
                                 f"this system spans {self.domains} domains; pass scaleout_gbps=... "
                                 "(--scaleout-gbps on the command line)")
        else:
            _positive(who, "scaleout_gbps", self.scaleout_gbps)
        if self.power_basis is None:
            set_("power_basis", "system (all-in)" if self.power_w is not None else "chip")
        if self.power_basis not in POWER_BASES:
            raise ConfigError(f"{who}: power_basis = {self.power_basis!r} is unknown; choose one of "
                              f"{', '.join(map(repr, POWER_BASES))}")
        if self.power_w is None and not self.mixed_chips:
            set_("power_w", self.chip.power_w)
        if self.power_w is not None:
            _positive(who, "power_w", self.power_w)

    # -- chips --
    @property
    def chips(self) -> tuple:
        """The chip of every device."""
        return self.device_chips or (self.chip,) * self.devices

    @property
    def mixed_chips(self) -> bool:
        return len(set(self.chips)) > 1

    def chip_of(self, device: int):
        return self.device_chips[device] if self.device_chips else self.chip

    def power_of(self, device: int) -> float | None:
        """W for one device: the system's figure, else its chip's (None: unknown)."""
        return self.power_w if self.power_w is not None else self.chip_of(device).power_w

    @property
    def total_power_w(self) -> float | None:
        powers = [self.power_of(i) for i in range(self.devices)]
        return None if any(p is None for p in powers) else sum(powers)

    # -- layout --
    @property
    def domains(self) -> int:
        return -(-self.devices // self.domain)

    @property
    def domain_sizes(self) -> list[int]:
        return [min(self.domain, self.devices - d * self.domain) for d in range(self.domains)]

    def domain_of(self, device: int) -> int:
        return device // self.domain

    # -- links in SI units --
    @property
    def scaleup(self) -> Link:
        return Link(self.scaleup_latency_us / 1e6, self.scaleup_gbps * 1e9)

    @property
    def scaleout(self) -> Link | None:
        if self.scaleout_gbps is None:
            return None
        return Link(self.scaleout_latency_us / 1e6, self.scaleout_gbps * 1e9)

    def link(self, i: int, j: int) -> Link:
        return self.scaleup if self.domain_of(i) == self.domain_of(j) else self.scaleout

    @property
    def peak_flops(self) -> float:
        """System dense BF16 peak, FLOP/s."""
        return self.peak("bf16")

    def peak(self, dtype: str = "bf16") -> float:
        return sum(c.peak_flops(dtype) for c in self.chips)

    # -- construction --
    @classmethod
    def preset(cls, name: str, **overrides) -> System:
        key = str(name).strip().lower()
        if key not in PRESETS:
            close = difflib.get_close_matches(key, PRESETS, n=3, cutoff=0.4)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"system preset = {name!r} is unknown; {hint}presets: {', '.join(PRESETS)}")
        chip, devices, domain, power, note, _source = PRESETS[key]
        kw = dict(chip=chip, devices=devices, domain=domain, power_w=power, name=key, note=note)
        kw.update(overrides)
        return cls(**kw)

    @staticmethod
    def presets() -> list[str]:
        return list(PRESETS)

    @classmethod
    def mixed(cls, groups, domain: int | None = None, **links) -> System:
        """Devices of several chips in one run, e.g. System.mixed([("ascend-910c", 8), ("h100", 2)]):
        each device is throttled to its own chip; links run at the slowest chip's figures unless
        given."""
        groups = list(groups)
        if not groups or any(not isinstance(n, int) or n < 1 for _, n in groups):
            raise ConfigError(f"groups = {groups!r} is invalid; give (chip, count >= 1) pairs")
        per_device = tuple(chips.get(c) for c, n in groups for _ in range(n))
        return cls(per_device[0], len(per_device), domain=domain, device_chips=per_device, **links)

    def scaled(self, devices: int) -> System:
        """The same chip and fabric with another device count. The domain size is a property of
        the fabric (an NVL72 domain holds at most 72, an HGX node 8), so it is kept, capped at the
        device count: nvl72 scaled to 9 is one domain of 9, to 144 two domains of 72."""
        if self.mixed_chips:
            raise ConfigError("a system of mixed chips cannot be scaled; build it with System.mixed at the size wanted")
        return replace(self, devices=devices, domain=min(self.domain, devices), device_chips=())

    def describe(self) -> str:
        counts = {}
        for c in self.chips:
            counts[c.name] = counts.get(c.name, 0) + 1
        what = " + ".join(f"{n} x {c}" for c, n in counts.items())
        return (f"{what} ({self.domains} domain(s) of {self.domain}; "
                f"scale-up {self.scaleup_gbps:g} GB/s, {self.scaleup_latency_us:g} us; scale-out "
                f"{'unknown' if self.scaleout_gbps is None else f'{self.scaleout_gbps:g} GB/s'}, "
                f"{self.scaleout_latency_us:g} us)")
