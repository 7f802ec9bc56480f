"""The fabric: everything the collective layer needs to time a message, as one value.

    fabric = Fabric.of(system)                 # calibrated (emulator/hardware/fabrics.toml)
    fabric = Fabric.ideal(system)              # line rate, no overheads (the textbook model)
    cls, link = fabric.link(i, j)              # the link class and timing of a message i -> j

A Fabric holds the system's two link classes (scale-up inside a domain, scale-out across), the
element size of the buffer being moved, the protocol in force and any straggler's slow links.
What the calibrated model adds to the data-sheet figures, per link class (see fabrics.toml):
  - a bulk efficiency (the share of the line rate a ring reaches);
  - LogGP's per-message overhead o, which occupies the sending port (a fan-out pays it k times);
  - two protocols, as NCCL and RCCL have: low-latency (LL: small fixed cost, a quarter of the
    rate) and bulk (Simple: a larger fixed cost per collective and per ring step, the full rate);
  - in-switch reduction: NVLS as its own link class "switch"; InfiniBand SHARP across domains
    ("sharp"), where the System says its scale-out switches have it and the class gives a rate.
The timing itself (ports, arrival) is in core.py; the closed forms in closed.py.
"""

from __future__ import annotations

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from relay.errors import ConfigError

FABRICS = Path(__file__).resolve().parents[1] / "hardware" / "fabrics.toml"
PROTOCOLS = ("ll", "simple")


@dataclass(frozen=True)
class FabricClass:
    """Calibrated figures of one kind of link (fabrics.toml documents each field)."""
    name: str
    display: str = ""
    eff: float = 0.8  # bulk rate / line rate
    latency_us: float | None = None  # per-message latency; None: the chip's
    o_us: float = 0.5  # per-message port overhead (LogGP o)
    ll_bw: float = 0.25  # LL rate / bulk rate
    ll_base_us: float = 3.6  # per-collective fixed cost, LL
    simple_base_us: float = 8.4  # per-collective fixed cost, Simple
    simple_step_us: float = 2.93  # extra per ring step, Simple over LL
    mesh: bool = False  # every pair of devices has its own link: direct algorithms run at full rate
    switch: str = "none"  # in-switch reduction in the scale-up switch: "nvls" or "none"
    switch_eff: float = 0.0  # switch reduce + multicast rate / line rate
    switch_min_devices: int = 0  # fewest devices the vendor library uses it for
    switch_base_us: float = 0.0  # per-collective fixed cost of the switch path
    sharp_eff: float = 0.0  # in-network reduction (InfiniBand SHARP) rate / line rate; 0: none
    chunk_kib: float = 0.0  # Simple protocol: bytes a message moves per handshake; 0: not chunked
    chunk_us: float = 0.0  # Simple protocol: port time of one chunk's handshake
    estimates: tuple = ()
    sources: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        for f in ("eff", "ll_bw"):
            v = getattr(self, f)
            if not 0 < v <= 1:
                raise ConfigError(f"fabric {self.name!r}: {f} = {v!r} is invalid; give a fraction in (0, 1]")
        for f in ("o_us", "ll_base_us", "simple_base_us", "simple_step_us", "switch_base_us", "chunk_kib",
                  "chunk_us"):
            if getattr(self, f) < 0:
                raise ConfigError(f"fabric {self.name!r}: {f} = {getattr(self, f)!r} is negative; give >= 0")
        if self.switch not in ("none", "nvls"):
            raise ConfigError(f"fabric {self.name!r}: switch = {self.switch!r}; choose none or nvls")
        if not 0 <= self.sharp_eff <= 1:
            raise ConfigError(f"fabric {self.name!r}: sharp_eff = {self.sharp_eff!r}; give a fraction in [0, 1]")
        if self.switch != "none" and not 0 < self.switch_eff <= 1:
            raise ConfigError(f"fabric {self.name!r}: switch_eff = {self.switch_eff!r}; give a fraction in (0, 1]")


def load(path: Path | str = FABRICS) -> dict[str, FabricClass]:
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    base = dict(data.pop("default"))
    base_sources = base.pop("sources", {})
    known = {f.name for f in fields(FabricClass)} - {"name"}
    out = {"default": FabricClass(name="default", **{k: v for k, v in base.items() if k != "estimates"},
                                  estimates=tuple(base.get("estimates", ())), sources=base_sources)}
    for name, raw in data.items():
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"fabric {name!r}: unknown field(s) {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(sorted(known))}")
        kw = {**base, **raw}
        kw["sources"] = {**base_sources, **raw.get("sources", {})}
        kw["estimates"] = tuple(sorted(set(raw.get("estimates", ())) |
                                       (set(base.get("estimates", ())) - set(raw))))
        out[name] = FabricClass(name=name, **{k: v for k, v in kw.items() if k not in ("sources", "estimates")},
                                estimates=kw["estimates"], sources=kw["sources"])
    return out


CLASSES: dict[str, FabricClass] = load()
IDEAL = FabricClass("ideal", "line rate, no overheads", eff=1.0, o_us=0.0, ll_bw=1.0, ll_base_us=0.0,
                    simple_base_us=0.0, simple_step_us=0.0)


def fabric_class(name: str | None) -> FabricClass:
    if name is None:
        return CLASSES["default"]
    if name not in CLASSES:
        raise ConfigError(f"fabric = {name!r} is not in fabrics.toml; known: {', '.join(CLASSES)}")
    return CLASSES[name]


@dataclass(frozen=True)
class Timing:
    """How one message is timed on a link: port busy o + wire_s(n), arrival latency after that.
    A chunked link (chunk_B > 0) moves a message as ceil(n / chunk_B) pipelined chunks, each
    paying chunk_s of handshake on the port besides its bytes."""
    latency_s: float
    Bps: float
    o_s: float = 0.0
    chunk_B: float = 0.0
    chunk_s: float = 0.0

    def chunks(self, n: float) -> int:
        """Chunks a message of n bytes moves as (1 on an unchunked link; 0 for no bytes)."""
        if n <= 0:
            return 0
        return max(1, math.ceil(n / self.chunk_B - 1e-9)) if self.chunk_B else 1

    def wire_s(self, n: float) -> float:
        """Seconds a message of n bytes holds a port, besides o: its bytes and its chunks' handshakes."""
        return n / self.Bps + (self.chunks(n) * self.chunk_s if self.chunk_B else 0.0)


@dataclass(frozen=True)
class Fabric:
    """The link model of one system, passed as one value to the executors and closed forms.
    Build it with Fabric.of / Fabric.ideal; collectives.resolve() fixes the protocol and
    algorithm for one collective; with_(elem_bytes=...) sets the buffer's element size."""
    up_line: Timing  # scale-up line rate and latency (from the system)
    out_line: Timing | None  # scale-out; None: unknown
    domain: int  # devices per scale-up domain
    devices: int
    up_class: FabricClass = IDEAL
    out_class: FabricClass = IDEAL
    elem_bytes: int = 4  # bytes per element of the buffer being moved
    protocol: str = "simple"  # "ll" or "simple"
    algorithm: str = ""  # the algorithm it times ("nvls" has its own fixed cost); set by resolve()
    slowdown: tuple = ()  # ((device, factor), ...): a straggler's links, slower by factor
    sharp: bool = False  # the scale-out switches reduce (the System says so; the class gives the rate)
    members: tuple = ()  # a process group's fabric: the device of each group rank; (): rank = device
    member_domain: int = 0  # with members: the whole system's devices per domain (link classes)

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol = {self.protocol!r} is unknown; choose one of {', '.join(PROTOCOLS)}")
        # resolved once: link() runs for every message
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("_up", self._timing(self.up_line, self.up_class))
        set_("_out", None if self.out_line is None else self._timing(self.out_line, self.out_class))
        set_("_slow", dict(self.slowdown))
        p, c = self.domain, self.up_class
        # NVLS moves (1 + 1/p) n per device where a point-to-point all-reduce moves 2 (p-1)/p n:
        # Relay moves the data point to point and rates the switch class so that the clock
        # charges the switch's traffic (closed form in closed.py)
        rate = self.up_line.Bps * c.switch_eff * 2 * (p - 1) / (p + 1) if c.switch != "none" and p > 1 else 0.0
        set_("_switch", Timing(self._up.latency_s, rate) if rate else None)
        # SHARP: each device's block (n / domain) goes up to the switches once and comes back once,
        # where a direct reduce-scatter + all-gather among the q domains moves 2 (q-1)/q of it: the
        # "sharp" class is rated so that the clock charges the switch's traffic (closed.py)
        q, on = self.domains, self.sharp and self.domains > 1 and self.out_line is not None
        rate = self.out_line.Bps * self.out_class.sharp_eff * 2 * (q - 1) / q if on else 0.0
        set_("_sharp", Timing(self._out.latency_s, rate) if rate else None)

    def _timing(self, line: Timing, c: FabricClass) -> Timing:
        lat = line.latency_s
        if self.protocol == "ll":
            return Timing(lat, line.Bps * c.eff * c.ll_bw, c.o_us / 1e6)
        bulk = line.Bps * c.eff
        if not (c.chunk_kib and c.chunk_us):
            return Timing(lat + c.simple_step_us / 1e6, bulk, c.o_us / 1e6)
        # eff is measured on whole chunks, handshakes included: the wire itself is faster, so that
        # a message of whole chunks takes n / (eff x line) exactly and only a partial chunk pays more
        S, h = c.chunk_kib * 1024, c.chunk_us / 1e6
        if h >= S / bulk:
            raise ConfigError(f"fabric {c.name!r}: chunk_us = {c.chunk_us!r} is no less than a chunk's "
                             f"{S / bulk * 1e6:.3g} us at {bulk / 1e9:.4g} GB/s; give a smaller chunk_us")
        return Timing(lat + c.simple_step_us / 1e6, 1.0 / (1.0 / bulk - h / S), c.o_us / 1e6, S, h)

    # -- construction --
    @classmethod
    def of(cls, system, elem_bytes: int = 4, slowdown: dict | None = None, scaleup: str | None = None,
           scaleout: str | None = None) -> Fabric:
        """The calibrated fabric of a System: its chip's fabric classes unless named here.
        A latency the user set on the system (not the chip's) is kept over the fabric's.
        A system built with link_model="ideal" gets Fabric.ideal instead."""
        if getattr(system, "link_model", "calibrated") == "ideal":
            return cls.ideal(system, elem_bytes, slowdown)
        chip = system.chip
        up_c = fabric_class(scaleup or getattr(chip, "scaleup_fabric", None))
        out_c = fabric_class(scaleout or getattr(chip, "scaleout_fabric", None))

        def latency_us(given, chips, c):  # a fabric's measured latency, unless the user set one
            return given if c.latency_us is None or given != chips else c.latency_us
        sharp = getattr(system, "sharp", False)
        if sharp and (system.scaleout_gbps is None or not out_c.sharp_eff):
            raise ConfigError(f"system {system.name or chip.name}: sharp = True, but its scale-out fabric "
                             f"{out_c.name!r} has no in-network reduction (sharp_eff in fabrics.toml); "
                             "drop sharp, or choose an InfiniBand fabric that has it (ib-hdr, ib-ndr)")
        up = Timing(latency_us(system.scaleup_latency_us, chip.scaleup_latency_us, up_c) / 1e6,
                    system.scaleup_gbps * 1e9)
        out = None if system.scaleout_gbps is None else Timing(
            latency_us(system.scaleout_latency_us, chip.scaleout_latency_us, out_c) / 1e6,
            system.scaleout_gbps * 1e9)
        return cls(up, out, system.domain, system.devices, up_c, out_c, elem_bytes, "simple", "",
                   tuple(sorted((slowdown or {}).items())), sharp)

    @classmethod
    def ideal(cls, system, elem_bytes: int = 4, slowdown: dict | None = None) -> Fabric:
        """Line rate, the system's latency, no overheads: Relay's model before calibration."""
        up = Timing(system.scaleup_latency_us / 1e6, system.scaleup_gbps * 1e9)
        out = None if system.scaleout_gbps is None else \
            Timing(system.scaleout_latency_us / 1e6, system.scaleout_gbps * 1e9)
        return cls(up, out, system.domain, system.devices, IDEAL, IDEAL, elem_bytes, "simple", "",
                   tuple(sorted((slowdown or {}).items())))

    def group(self, members, domain: int) -> Fabric:
        """The fabric of a process group: group rank i is device members[i]. Its size and `domain`
        (its own devices per domain, for the closed forms and the fixed costs) are the group's;
        each message still takes the link between the two devices, with their slowdowns."""
        members = tuple(members)
        if self.members:
            members = tuple(self.members[m] for m in members)
        return replace(self, devices=len(members), domain=domain, members=members,
                       member_domain=self.member_domain or self.domain)

    def with_(self, **changes) -> Fabric:
        """A copy with some fields changed, e.g. fabric.with_(elem_bytes=2, protocol="ll")."""
        return replace(self, **changes)

    # -- the link model --
    @property
    def domains(self) -> int:
        return -(-self.devices // self.domain)

    @property
    def switch_timing(self) -> Timing | None:
        """Timing of the "switch" class (in-switch reduction); None where the fabric has none."""
        return self._switch

    @property
    def has_switch(self) -> bool:
        return self._switch is not None

    @property
    def sharp_timing(self) -> Timing | None:
        """Timing of the "sharp" class (in-network reduction across domains); None where off."""
        return self._sharp

    def sharp_allowed(self) -> bool:
        """Whether the vendor library would reduce in the scale-out switches (NCCL CollNet): the
        system has SHARP and spans domains."""
        return self._sharp is not None

    def link(self, i: int, j: int, via: str = "") -> tuple[str, Timing]:
        """(class, Timing) of a message from device i to device j; `via` names a class the schedule
        chose for its step: "switch" (NVLS) for every message, "sharp" for those between domains."""
        domain = self.domain
        if self.members:
            i, j, domain = self.members[i], self.members[j], self.member_domain
        if via == "switch":
            cls, t = via, self._switch
        elif via == "sharp" and i // domain != j // domain:
            cls, t = via, self._sharp
        elif i // domain == j // domain:
            cls, t = "up", self._up
        else:
            cls, t = "out", self._out
        if self._slow:
            f = max(self._slow.get(i, 1.0), self._slow.get(j, 1.0))
            if f != 1.0:
                t = Timing(t.latency_s * f, t.Bps / f, t.o_s * f, t.chunk_B, t.chunk_s * f)
        return cls, t

    def bottleneck(self) -> tuple[FabricClass, Timing]:
        """The class a flat algorithm is paced by: scale-out when the system spans domains."""
        return (self.up_class, self._up) if self.domains == 1 else (self.out_class, self._out)

    def base_s(self, algorithm: str | None = None) -> float:
        """Fixed cost of one collective (launch and set-up), paid once before its first step, for
        `algorithm` (default: the one this fabric was resolved for)."""
        c, _ = self.bottleneck()
        if (self.algorithm if algorithm is None else algorithm) == "nvls":
            return self.up_class.switch_base_us / 1e6
        return (c.ll_base_us if self.protocol == "ll" else c.simple_base_us) / 1e6

    def switch_allowed(self) -> bool:
        """Whether the vendor library would use in-switch reduction here (one domain, enough devices)."""
        return self.has_switch and self.domains == 1 and self.devices >= self.up_class.switch_min_devices
