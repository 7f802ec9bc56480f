"""FSDP2's step as the device timeline runs it (relay.kernels.timeline), for the plan search.

With implicit prefetch the host runs ahead of the compute stream, so FSDP2's all-gathers, on
streams of their own, run while the compute stream still works on the unit before. What bounds
them is FSDP2's own ordering and the device's one communication lane (collectives run in issue
order, each from max(ready, the lane)):

    forward    the root's gather, then each block's; block i+1's gather waits for block i's
               copy-out (FSDP2 makes its all-gather streams wait on the previous copy-out event,
               recorded when block i starts computing); a block computes once its gather is in
    backward   the head's backward (the last block's gather, issued by the host ahead of it,
               runs beside it), then the blocks last to first; entering block i's backward
               issues the gather of block i-1 (FSDP2's backward prefetch), and finishing it
               issues block i's reduce-scatter (its stream waits for the compute stream); so the
               lane carries gather(L-1), gather(L-2), scatter(L-1), gather(L-3), scatter(L-2), ...
               then the root's reduce-scatter; the optimizer waits for the last one

The root (embedding, final norm, head) stays gathered after forward (FSDP2 does not reshard the
root), so it is gathered once. Under a pipeline (torch's schedules) a stage's units are gathered
as in one microbatch's forward and backward (then kept: reshard_after_backward is off until the
last backward), and every reduce-scatter is sent after the schedule, exposed. Checked against
fake-tensor runs (tests/ray/test_plan_search.py, `relay plan --confirm`).
"""

from __future__ import annotations

from relay.analytic import activations


def fsdp_microbatch(forward: list, backward: list, gathers: list, scatters: list, head: tuple,
                    root: tuple) -> float:
    """Emulated seconds from a microbatch's first gather to its last reduce-scatter (or its last
    backward op, if later). forward[i], backward[i]: block i's compute-stream seconds; gathers[i],
    scatters[i]: its collectives'; head: the root's (forward, backward) compute after the blocks;
    root: its (gather, reduce-scatter) seconds."""
    n = len(forward)
    lane = root[0]  # the root's gather first; the embedding waits for it
    t = lane
    starts = []
    for i in range(n):  # forward: each block's gather issued as the block before starts
        ready = starts[-1] if starts else t
        lane = max(lane, ready) + gathers[i]
        t = max(t, lane)
        starts.append(t)
        t += forward[i]
    gathered = {}  # block -> when its backward gather ends
    if n:  # issued by the host as it reaches the last block's backward: ahead of the head's compute
        lane = max(lane, t) + gathers[-1]
        gathered[n - 1] = lane
    t += head[0] + head[1]
    for i in reversed(range(n)):
        t = max(t, gathered[i])
        if i:  # entering block i prefetches block i-1 (ready once block i's copy-out is recorded)
            lane = max(lane, t) + gathers[i - 1]
            gathered[i - 1] = lane
        t += backward[i]
        lane = max(lane, t) + scatters[i]
    lane = max(lane, t) + root[1]
    return max(t, lane)


def fsdp_exposed(plan, parts: list, dense: list, coll, microbatches: int = 1) -> float:
    """The FSDP2 communication the compute stream waits for in a step of `microbatches`
    accumulated microbatches (each gathers and reduce-scatters), emulated seconds:
    parts, the blocks' measured Parts then the root's; dense[i], part i's parameters FSDP2 shards
    over dp (the rest, its experts', over dp_outer); coll(dim, primitive, elements) -> seconds."""
    blocks, base = parts[:-1], parts[-1]
    fwd = [p.forward_s for p in blocks]
    bwd = [p.backward_s + activations.rerun(plan, i, p)[0] for i, p in enumerate(blocks)]  # (and any recompute)
    experts = [p.expert_params * plan.shards_experts for p in blocks]
    g = [coll("dp", "all_gather", n) + coll("dp_outer", "all_gather", e) for n, e in zip(dense, experts)]
    r = [coll("dp", "reduce_scatter", n) + coll("dp_outer", "reduce_scatter", e) for n, e in zip(dense, experts)]
    root = (coll("dp", "all_gather", dense[-1]), coll("dp", "reduce_scatter", dense[-1]))
    compute, head = sum(fwd) + sum(bwd) + base.forward_s + base.backward_s, (base.forward_s, base.backward_s)
    if plan.pp > 1:  # torch's pipelining: gathered as one microbatch gathers, every reduce-scatter after the schedule
        return fsdp_microbatch(fwd, bwd, g, [0.0] * len(r), head, (root[0], 0.0)) - compute + sum(r) + root[1]
    return microbatches * (fsdp_microbatch(fwd, bwd, g, r, head, root) - compute)
