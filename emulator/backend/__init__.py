"""`relay`: a torch.distributed backend whose every operation runs through Relay's schedules,
transport and fabric model on the emulated devices.

    engine.py   one device's communication thread, lanes and Work objects
    group.py    the ProcessGroup torch calls (all_reduce, all_to_all_single, send, ...)
    program.py  running a function or a script on a device with the backend initialised

The backend lives in the device processes: `register()` is called there by program.py, and a
group can only be created while a program runs (it needs the device's engine).
"""

from __future__ import annotations

import torch.distributed as dist

NAME = "relay"
_engine = None  # the running program's engine, in this device process


def _create(options, _backend_options=None):
    from emulator.backend.engine import group_of
    from emulator.backend.group import RelayProcessGroup
    if _engine is None:
        raise RuntimeError("the relay backend runs only on Relay's devices: start the program with "
                           "cluster.launch(fn) or `relay launch script.py`")
    members = list(options.global_ranks_in_group) or list(range(options.group_size))
    group = group_of(_engine.system, _engine.links, members, _engine.device)
    return RelayProcessGroup(_engine, group)


def register() -> None:
    if NAME.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(NAME, _create, extended_api=True, devices=["cpu"])


def activate(engine) -> None:
    """The engine that groups created from now on in this process use (None: none)."""
    global _engine
    _engine = engine
