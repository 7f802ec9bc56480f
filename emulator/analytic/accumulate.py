"""Gradient accumulation in the plan search (planner.py): the microbatch counts a plan may run,
with or without a pipeline. Without one, a replica runs its m microbatches' forward and backward
one after the other; DDP synchronises its gradients once, in the last backward (no_sync), FSDP2
reduce-scatters each microbatch's into the shards (as torchtitan; device/training/parallel.py),
so that any dp dividing the global batch over the micro-batch size takes the same global batch.
With one, a training loop may still accumulate over several pipeline schedules (torch's
schedule.step called per local batch, as NeMo AutoModel does): planner.cost(schedules=)."""

from __future__ import annotations

from relay.errors import ConfigError

MICRO_BATCHES = (1, 2, 4)  # samples per microbatch the search tries


def microbatch_counts(replica: int, pp: int) -> list:
    """Microbatches per step of a replica of `replica` samples: under a pipeline, those of
    MICRO_BATCHES samples, at least pp; without one, its whole batch at once (None) and each
    accumulation of MICRO_BATCHES samples."""
    counts = sorted({replica // mb for mb in MICRO_BATCHES if replica % mb == 0 and replica // mb >= max(pp, 2)})
    return counts if pp > 1 else [None, *counts]


def adds(plan, parts, tensors, kernels) -> float:
    """Emulated seconds of adding each microbatch's gradients after the first into the held ones
    (autograd's AccumulateGrad; under FSDP2, into the shards after each reduce-scatter): one add
    per parameter tensor, reading two and writing one of its (held) elements. Without a pipeline only (a pipeline's
    schedule is calibrated as a whole). `parts`, `tensors`, `kernels`: as planner._data_parallel's."""
    m = plan.n_microbatches
    if plan.pp > 1 or m == 1:
        return 0.0
    experts = sum(p.expert_params for p in parts)
    dense = sum(p.params for p in parts) - experts
    held = (dense / plan.dp + experts / plan.dp_outer if plan.shards_experts else dense / plan.dp + experts) \
        if plan.fsdp else dense + experts  # (as footprint.py holds them)
    return (m - 1) * kernels.seconds(sum(n for n, _ in tensors), 3 * held)


def check_schedules(plan, schedules: int) -> None:
    """Refuses pipeline schedules a step cannot run: its microbatches split evenly, and only under a pipeline."""
    pipelined = schedules == 1 or plan.pp > 1
    if type(schedules) is not int or schedules < 1 or plan.n_microbatches % schedules or not pipelined:
        raise ConfigError(f"schedules = {schedules!r} is invalid for {plan}; give 1, or with pp > 1 a divisor of its "
                          f"{plan.n_microbatches} microbatches")
