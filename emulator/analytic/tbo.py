"""Two micro-batches overlapping the expert all-to-all with compute (DeepSeek's dual micro-batch
overlap, SGLang's two-batch overlap), timed as the device step runs them
(device/training/serving.forward): in each block, each half's attention and routing, its
dispatch issued; then each half's local experts, its combine issued; a half's combine is waited
for by its next block, whose first work is the combine's unpermute and the shared experts. The
compute is one stream and the all-to-alls a second that serves them in the order issued (every
device alike under balanced routing, so all start each one together), and the step is that
two-resource schedule over the blocks (`timeline`). Each half reads every weight and launches
every kernel: the overlap hides one half's all-to-all behind the other half's compute, and
saves nothing else.

A MoE block's compute is measured in those three stages (`stages`) on fake tensors under the
throttle, as the serving model measures whole blocks (serving._measure), so the stages add up
to the block's cost. Units: emulated seconds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from relay.hardware import chips
from relay.kernels.clock import VirtualLane
from relay.kernels.throttle import Throttle
from relay.workloads import inference


@dataclass(frozen=True)
class Half:
    """One micro-batch's costs, emulated seconds: a dense block (attention + SwiGLU), a MoE block's
    three compute stages, and its dispatch and combine."""

    dense: float
    pre: float  # attention, router, the dispatch buffer
    experts: float  # the local experts on the rows received
    post: float  # the combine's unpermute, the shared experts, the residual
    dispatch: float
    combine: float


@functools.cache
def stages(build, cost, workload: str, config, tp: int, local: int, chip: str, dtype: str, batch: int,
           tokens: int, context: int, launch_us: float | None = None) -> tuple[float, float, float]:
    """A MoE block's compute (pre, experts, post) for `batch` sequences: `build(workload, config, tp,
    local, n_layers, dense)` makes the one-block model on the meta device (serving._model), `cost` is
    the cost model's class (serving.ServingCost), launch_us its override (a captured graph's)."""
    with torch.device("meta"):
        model = build(workload, config, tp, local, 1, 0)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = model.to_empty(device="cpu")
    with mode, torch.no_grad():
        cache = inference.new_cache(model, batch, max(context, tokens))
        cache.length = start = context - tokens  # 0 for a prefill
        cos, sin = inference.rotary(model, cache, tokens, tokens - 1 if start else 0)
        x, block = model.tok(torch.zeros(batch, tokens, dtype=torch.long)), model.blocks[0]
        throttle = Throttle(cost(chips.get(chip), dtype, launch_us=launch_us), VirtualLane())
        with throttle:
            x = inference.attention(block, x, cos, sin, cache.layers[0], start)
            s = block.ffn.start(block.ffn_norm(x))
            t1 = throttle.emulated_s
            block.ffn.expert_rows(s)
            t2 = throttle.emulated_s
            x = x + block.ffn.finish(s)
            t3 = throttle.emulated_s
    return t1, t2 - t1, t3 - t2


def timeline(halves: tuple[Half, Half], n_dense: int, n_moe: int, base: float) -> float:
    """The step's emulated seconds: n_dense dense blocks, then n_moe MoE blocks (DeepSeek-V3's
    order), each half in turn, then `base` (the embedding, final norm and head)."""
    t = port = 0.0  # the compute stream's clock; when the all-to-all stream is free
    pending: list = [None, None]  # per half: when its last combine lands
    for i in range(n_dense + n_moe):
        moe, landed = i >= n_dense, [0.0, 0.0]
        for m, h in enumerate(halves):
            if pending[m] is not None:
                t, pending[m] = max(t, pending[m]) + h.post, None
            if not moe:
                t += h.dense
                continue
            t += h.pre
            port = max(t, port) + h.dispatch
            landed[m] = port
        if moe:
            for m, h in enumerate(halves):
                t = max(t, landed[m]) + h.experts
                port = max(t, port) + h.combine
                pending[m] = port
    for m, h in enumerate(halves):
        if pending[m] is not None:
            t = max(t, pending[m]) + h.post
    return t + base
