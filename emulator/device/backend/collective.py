"""A collective of a process group on one device: the group's place in the system (`Group`),
the algorithm and protocol it runs (`choose`), and `run_collective`, the one code path of every
collective a device runs (the `relay` backend's, engine.py, and the trainer's, training.py)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch

from relay.collectives import AUTO, pipeline_chunks, resolve
from relay.collectives.core import Ports
from relay.collectives.fabric import Fabric
from relay.collectives.schedules import PRIMITIVES, Topology, algorithms_for, check, schedule
from relay.errors import ConfigError


def algorithms(choice=None) -> dict:
    """Per primitive, the algorithm: None (auto: the vendor library's choice, per size), one name
    for every primitive it implements, or a dict {primitive: algorithm}."""
    out = {p: AUTO for p in PRIMITIVES}
    if isinstance(choice, str):
        check("all_reduce", choice, allow_auto=True)  # an unknown name is refused
        out.update({p: choice for p in out if choice == AUTO or choice in algorithms_for(p)})
    elif choice:
        if not isinstance(choice, dict):
            raise ConfigError(f"algorithm = {choice!r} is invalid; give a name (e.g. 'ring') or a dict "
                              "{primitive: algorithm}")
        for p, a in choice.items():
            check(p, a, allow_auto=True)
            out[p] = a
    return out


@dataclass(frozen=True)
class Group:
    """A process group as the engine sees it: group rank i is device members[i]."""
    members: tuple[int, ...]
    rank: int  # this device's group rank
    system: object  # the group's own System: its size, and its scale-up domains
    regular: bool  # members fill equal scale-up domains, domain by domain (two-level algorithms apply)
    fabric: Fabric = field(repr=False)  # the group's fabric: each message on its devices' link

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def topology(self) -> Topology:
        return Topology(self.size, self.system.domain)

    @property
    def ranks(self) -> list[int] | None:
        """The transport's rank mapping (None: group rank = device)."""
        return None if self.members == tuple(range(len(self.members))) else list(self.members)


def group_of(system, fabric: Fabric, members, device: int) -> Group:
    """The members' places in `system`: a group inside one scale-up domain runs on its links.
    Runs of members in one domain, equal and in distinct domains, make the group's domains; a
    group that is not so regular gets a domain of its longest run (flat algorithms then pace by
    the scale-out link when it spans domains) and no two-level algorithm."""
    members = tuple(members)
    doms = [system.domain_of(m) for m in members]
    runs = [1]
    for a, b in zip(doms, doms[1:]):
        runs[-1:] = [runs[-1] + 1] if a == b else [runs[-1], 1]
    regular = len(set(runs)) == 1 and len(runs) == len(set(doms))
    domain = runs[0] if regular else max(runs)
    chips = tuple(system.chip_of(m) for m in members) if system.device_chips else ()
    sub = replace(system, devices=len(members), domain=domain, device_chips=chips)
    return Group(members, members.index(device), sub, regular, fabric.group(members, domain))


TWO_LEVEL = ("hierarchical", "hier_pipelined", "sharp")  # need a group of equal domains, in order


def choose(primitive: str, algorithm: str, nbytes: float, group: Group, fabric: Fabric) -> tuple[str, Fabric]:
    """The algorithm and the protocol for one collective of `group` (`auto` resolved), as
    collectives.resolve chooses them for the group's own system; a group without two equal
    levels runs the flat algorithm instead of a two-level one."""
    flat = "direct" if primitive == "all_to_all" else "ring"
    alg, fab = resolve(primitive, flat if not group.regular and algorithm in TWO_LEVEL else algorithm, nbytes,
                       group.system, fabric)
    if not group.regular and alg in TWO_LEVEL:  # auto's pick
        alg, fab = resolve(primitive, flat, nbytes, group.system, fabric)
    return alg, fab


def run_collective(transport, group: Group, primitive: str, algorithm: str, buf: torch.Tensor, count: int,
                   lane, ready: float, op: str = "sum", elem_bytes: int | None = None, nbytes: float | None = None,
                   fail_at: int | None = None, **options) -> tuple[float, float]:
    """One collective of `group` on `buf` (flat, CPU), paced on `lane` from `ready`: THE code
    path of every collective a device runs, the backend's, the trainer's and the collective
    jobs' (jobs.py). `elem_bytes`: the emulated size of an element (default: the real one);
    `nbytes`: the size that chooses the algorithm and protocol (default: count elements);
    `fail_at`: an injected failure at that step. Returns the emulated (start, end)."""
    elem = elem_bytes or buf.element_size()
    steps, fabric = _plan(group, primitive, algorithm, count, elem, nbytes, tuple(sorted(options.items())))
    lane.advance_to(ready)
    start = lane.now()
    transport.run(steps, buf, lane, Ports(), fabric, fail_at=fail_at, ranks=group.ranks, op=op)
    return start, lane.now()


@functools.lru_cache(maxsize=4096)
def _plan(group: Group, primitive: str, algorithm: str, count: int, elem: int, nbytes, options: tuple):
    """The schedule and the resolved fabric of one collective (the same ones recur every step)."""
    alg, fabric, options = resolved(group, primitive, algorithm, count, elem, nbytes, options)
    return schedule(primitive, alg, group.rank, group.size, count, group.topology, **options), fabric


@functools.lru_cache(maxsize=4096)
def resolved(group: Group, primitive: str, algorithm: str, count: int, elem: int, nbytes, options: tuple):
    """(algorithm, fabric, schedule options) one collective runs with: `auto` and the protocol
    chosen for the group's system by `nbytes` (default: count elements of `elem` bytes)."""
    size = count * elem if nbytes is None else nbytes
    alg, fabric = choose(primitive, algorithm, size, group, group.fabric.with_(elem_bytes=elem))
    options = dict(options)
    options.setdefault("chunks", pipeline_chunks(primitive, alg, size, group.system))
    return alg, fabric, options
