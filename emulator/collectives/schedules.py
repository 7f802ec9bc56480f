"""The registry of collective schedules: which function builds the steps of each primitive and
algorithm, and the checks that refuse a pair that does not exist. The vocabulary (steps,
segments, topology, primitive semantics) is documented in steps.py, the algorithms in flat.py and
hierarchical.py; this module re-exports the vocabulary for its callers."""

from __future__ import annotations

from relay.collectives import alltoall, flat, hierarchical
from relay.collectives.flat import _Tree  # noqa: F401 (tests check the trees' shape)
from relay.collectives.hierarchical import stagger  # noqa: F401 (closed.py's pipelined form)
from relay.collectives.steps import Recv, Seg, Send, Step, Topology, seg_len, shards  # noqa: F401
from relay.errors import ConfigError

# ---------------------------------------------------------------- registry
PRIMITIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "all_to_all")
ALGORITHMS = ("ring", "tree", "halving_doubling", "direct", "hierarchical")  # point to point, every primitive
SWITCH_ALGORITHMS = ("nvls", "sharp")  # in-switch reduction: all_reduce only, where the system has it
ALL_REDUCE_ONLY = ("hier_pipelined",) + SWITCH_ALGORITHMS
_MODULE = {a: hierarchical if a.startswith("hier") else flat for a in ALGORITHMS}
SCHEDULES = {(p, a): getattr(_MODULE[a], f"{a}_{p}") for p in PRIMITIVES if p != "all_to_all" for a in ALGORITHMS}
SCHEDULES["all_to_all", "direct"] = alltoall.direct_all_to_all
SCHEDULES["all_to_all", "hierarchical"] = alltoall.hierarchical_all_to_all
SCHEDULES["all_reduce", "nvls"] = flat.nvls_all_reduce
SCHEDULES["all_reduce", "hier_pipelined"] = hierarchical.hier_pipelined_all_reduce
SCHEDULES["all_reduce", "sharp"] = hierarchical.sharp_all_reduce


def check(primitive: str, algorithm: str, allow_auto: bool = False) -> None:
    """Refuse an unknown primitive or algorithm (`auto` too, unless allowed: a schedule needs a
    concrete algorithm; closed.resolve picks one)."""
    if allow_auto and algorithm == "auto":
        algorithm = "direct"  # runs every primitive
    if primitive not in PRIMITIVES:
        raise ConfigError(f"primitive = {primitive!r} is unknown; choose one of {', '.join(PRIMITIVES)}")
    if algorithm not in ALGORITHMS + ALL_REDUCE_ONLY:
        raise ConfigError(f"algorithm = {algorithm!r} is unknown; choose one of "
                         f"{', '.join(ALGORITHMS + ALL_REDUCE_ONLY)} (or auto)")
    if (primitive, algorithm) not in SCHEDULES:
        raise ConfigError(f"algorithm = {algorithm!r} does not run {primitive}; choose one of "
                         f"{', '.join(algorithms_for(primitive))}")


def algorithms_for(primitive: str) -> tuple[str, ...]:
    """The algorithms that implement `primitive` (all-to-all: direct and hierarchical)."""
    return tuple(a for a in ALGORITHMS + ALL_REDUCE_ONLY if (primitive, a) in SCHEDULES)


def schedule(primitive: str, algorithm: str, rank: int, world: int, count: int,
             topology: Topology | None = None, **options) -> list[Step]:
    """The steps rank `rank` performs. options: root (broadcast), chunks (tree and chains),
    splits (all_to_all: splits[i][j] elements from rank i to rank j; see alltoall.py)."""
    check(primitive, algorithm)
    return SCHEDULES[primitive, algorithm](rank, world, count, topology or Topology(world, world),
                                           **options)
