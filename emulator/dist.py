"""For programs running on Relay's devices (`cluster.launch(fn)`, `relay launch script.py`):
where they run, and what they did.

    import relay.dist
    ctx = relay.dist.context()      # rank, world, system, local_rank, domain
    mesh = ctx.mesh(("dp", "tp"))      # a 2-D DeviceMesh, tensor parallelism inside each domain
    relay.dist.report(tokens=4096)  # counted into the run's throughput

Outside a Relay program, context() raises and report() does nothing (so a script still runs
under torchrun).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.distributed.device_mesh import init_device_mesh

_current = None  # the running program's Context, in this device process


@dataclass(frozen=True)
class Context:
    rank: int  # this device, which is also its torch.distributed global rank
    world: int  # devices in the program
    system: object = field(repr=False)  # the emulated System (chip, domains, links)
    clock: str  # "virtual" or "wall"
    engine: object = field(repr=False, compare=False)
    counts: dict = field(default_factory=dict, repr=False, compare=False)  # reported tokens, samples
    throttle: object = field(default=None, repr=False, compare=False)  # the compute lane's CommThrottle

    @property
    def domain(self) -> int:
        """Devices per scale-up domain."""
        return self.system.domain

    @property
    def local_rank(self) -> int:
        """Index inside this device's scale-up domain (torchrun's LOCAL_RANK under `relay launch`)."""
        return self.rank % self.system.domain

    def mesh(self, names=("dp", "tp"), shape=None):
        """A DeviceMesh over every device; by default (domains, devices per domain), so that the
        inner dimension (tensor or expert parallelism) stays inside a scale-up domain."""
        shape = tuple(shape or (self.world // self.domain, self.domain))
        return init_device_mesh("cpu", shape, mesh_dim_names=tuple(names))


def context() -> Context:
    if _current is None:
        raise RuntimeError("relay.dist.context(): no Relay program is running in this process; start "
                           "it with cluster.launch(fn) or `relay launch script.py`")
    return _current


def report(tokens: int | None = None, samples: int | None = None) -> None:
    """Add work this device did (e.g. once per step); the run's throughput is reported per
    emulated second."""
    if _current is None:
        return
    for k, v in (("tokens", tokens), ("samples", samples)):
        if v is not None:
            _current.counts[k] = _current.counts.get(k, 0) + v


def restart_clocks() -> None:
    """Virtual clock only: wait for all communication, meet every device (outside emulated time),
    and restart both lanes of every device at emulated 0, so that what follows is timed from a
    common zero (e.g. one collective, to compare with `simulate`)."""
    ctx = context()
    ctx.engine.restart()
