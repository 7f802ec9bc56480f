"""The reference for GPU programs run on Relay: the same script under plain torchrun on the CPU
host, with gloo, the harness patch stated here. The script's CUDA calls are answered by Relay's
virtual CUDA device (relay.device.backend.cuda: devices mapped to the host, torch.cuda's answers;
no throttle, no relay backend, no emulated clock) and init_process_group's backend is gloo, so
only the collectives and the numerics path differ from a Relay run. `--seed` seeds the host
generator first (for scripts that do not seed, such as PyTorch's DDP tutorial; run the script
under `relay launch` through this file too: on a Relay device it only seeds).

    python -m torch.distributed.run --nproc_per_node 2 bench/gpu_reference.py [--seed] SCRIPT ARGS...

Relay's side: `relay launch --chip h100 --devices 2 [bench/gpu_reference.py --seed] SCRIPT ARGS...`.
Losses (or saved weights) then compare bit for bit: the DDP tutorial's multigpu_torchrun.py, examples/gpu_train.py, and
tests/ray/programs/ (Hugging Face Trainer, accelerate, Lightning DDP and FSDP) did.
"""

import os
import runpy
import sys

import torch
import torch.distributed as dist

from relay.device.backend import cuda, streams
from relay.device.backend.hbm import Hbm
from relay.hardware import chips
from relay.kernels.timeline import Timeline


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--seed":
        torch.manual_seed(0)
        args = args[1:]
    if torch.cuda.is_available():  # on a Relay device (or a GPU): only the seeding, then the script
        _run(args)
        return
    original = dist.init_process_group

    def init_process_group(backend=None, *a, **k):
        k.pop("device_id", None)
        return original("gloo", *a, **k)
    dist.init_process_group = dist.distributed_c10d.init_process_group = init_process_group
    chip = chips.get("h100")
    with streams.emulated(Timeline(4e-6), None), cuda.emulated(chip, Hbm(chip)):  # (events need streams)
        _run(args)


def _run(args) -> None:
    sys.argv = args
    sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
    runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
