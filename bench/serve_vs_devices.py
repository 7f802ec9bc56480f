"""The serving model's decode step (emulator/analytic/serving.py) against the same step run on
Relay's device actors: moe-debug (MLA, a shared expert) with attention data parallel and expert
parallel over the devices, real tensors, the experts' dispatch and combine through the `relay`
backend's all-to-all (device/training/experts.py), every op charged by the throttle. The devices
run the model's own MoE layer (its sort, its counts exchanged by a first all-to-all, the tokens'
real routing), the analytic model its balanced EPShard and the closed-form all-to-all, so the two
differ by those; the ratio says by how much. Prints both steps (emulated ms) and the ratio.

    python bench/serve_vs_devices.py            (4 h100, batch 8 per device, context 24: about a minute)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from relay import Cluster, System
from relay.analytic import serving
from relay.workloads import get, inference


def decode_step(prompts, workload):
    """Prefill this device's prompts, meet at emulated 0, then one decode step: its emulated time."""
    import relay.dist as rd
    from relay.device.training.experts import expert_parallel
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = get(workload).build_model().eval()
    expert_parallel(model, dist.group.WORLD, world, rank)
    mine = prompts.chunk(world)[rank]
    with torch.no_grad():
        cache = inference.new_cache(model, mine.shape[0], mine.shape[1] + 1)
        token = inference.forward(model, mine, cache).argmax(-1, keepdim=True)
        rd.restart_clocks()
        inference.forward(model, token, cache)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="moe-debug")
    p.add_argument("--chip", default="h100")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="sequences per device")
    p.add_argument("--context", type=int, default=24,
                   help="prompt tokens before the decode step (below the model's seq_len)")
    args = p.parse_args(argv)
    system = System(args.chip, args.devices)
    prompts = torch.randint(0, get(args.workload).config.vocab_size, (args.batch * args.devices, args.context),
                            generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with Cluster(system) as cluster:
        run = cluster.launch(decode_step, prompts, args.workload).emulated_s
    layout = serving.Layout(args.devices, 1, args.devices)
    model = serving.phase(args.workload, layout, system, "bf16", args.batch, 1, args.context + 1, overlap=False)
    print(f"# {args.workload} on {args.devices} x {args.chip}, {layout}, batch {args.batch} per device, one decode "
          f"step at context {args.context + 1} (emulated ms); took {time.perf_counter() - start:.0f} real s")
    print(f"devices {run * 1e3:.4f}  analytic {model.seconds * 1e3:.4f}  analytic / devices {model.seconds / run:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
