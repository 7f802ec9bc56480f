"""What a device's blocks keep for backward under a plan, and what their recompute costs: the
part of the memory model (footprint.py) and of the plan's step (planner.py) that activation
checkpointing (Parallel's `ac`, workloads/checkpoint.py) and sequence parallelism (`sp`) change.
From the measured blocks (footprint.Part), as the runs do it (device/training/plans.py):

    no checkpointing   a block keeps what autograd saves (`activations`)
    full               its input only (s b d at the emulated dtype), and reruns its forward
    op (selective)     its input and the outputs of the ops the op policy keeps (`ac_saved_bytes`),
                       and reruns the forward except those ops (forward_s - ac_saved_s)
    layer:N            every Nth block of the device full, the others none
While a checkpointed block runs its backward its whole activations are live again: the largest
such block is added once (Korthikanti et al. 2022, section 5: "the memory needed to store the
activations of a single layer" on top of the stored inputs).

Sequence parallel: the blocks are measured with their norms and residual adds on 1 / tp of the
sequence (sequence_parallel.py, as plans.py runs them), so what its two norms save is already a
1 / tp share (`norm_bytes`, of the blocks measured without it); a checkpointed block's kept
input is divided by tp here: between blocks the residual stream is the sequence's shard
(plans.py, as torchtitan: RowwiseParallel to Shard(1)), so what torch.utils.checkpoint saves is
s/tp x b x d (Korthikanti et al.'s 2sbh per layer of full recompute, Table 2, is for tensor
parallel alone); the rest of a block is tensor parallel's. The
gathered inputs of the column-wise layers (a dense block's attention and MLP, a MoE block's
attention: s b d each) are saved whole by DTensor, as Relay's runs and torchtitan keep them;
Megatron saves its shard and gathers it again in backward (`regather`: its
LinearWithGradAccumulationAndAsyncCommunication, which overlaps that all-gather with the input
gradient's GEMM), so only 1 / tp of each is kept (Korthikanti et al.'s 34 s b h / t per layer).
"""

from __future__ import annotations

from relay.workloads import checkpoint


def block_activations(plan, part, gathered: float = 0.0) -> float:
    """Bytes one block (a footprint.Part, measured under the plan's sequence parallelism) saves
    for backward in one microbatch's forward, without checkpointing; `gathered`: the bytes of one
    s b d when the column-wise layers' gathered inputs are kept as shards (Megatron's regather),
    else 0."""
    if not plan.sp:
        return part.activations
    inputs = 1 if part.expert_params else 2  # a MoE block: its attention's alone (its MoE's, not modelled)
    # (at least 0: a parameters-only measurement, footprint.parameters, saves nothing to keep shards of)
    return max(part.activations - inputs * gathered * (1 - 1 / plan.tp), 0.0)


def kept(plan, blocks: list, held: float, block_input: float, regather: bool = False) -> float:
    """Bytes the device's `blocks` (in order) hold at its peak, `held` microbatches in flight:
    per block what it keeps, and one checkpointed block's whole activations while it recomputes.
    `block_input`: the bytes of one microbatch's s b d at the emulated dtype (a 1 / tp share of
    it is kept under sequence parallel); `regather`: the column-wise layers keep shards of their
    gathered inputs and gather them again in backward (Megatron, module docstring)."""
    gathered = block_input if regather else 0.0
    if plan.sp:
        block_input /= plan.tp
    per_mb, live = 0.0, 0.0
    for i, b in enumerate(blocks):
        how = checkpoint.recomputed(plan, i)
        if how == "none":
            per_mb += block_activations(plan, b, gathered)
            continue
        per_mb += block_input + (b.ac_saved_bytes if how == "op" else 0.0)
        live = max(live, block_activations(plan, b, gathered))
    return held * per_mb + live


def rerun(plan, i: int, part) -> tuple[float, int]:
    """Block `i` of the device in backward: (emulated seconds of the forward it reruns, 1 if it
    reruns its forward's collectives else 0). The op policy keeps no all-reduce nor all-to-all."""
    how = checkpoint.recomputed(plan, i)
    if how == "none":
        return 0.0, 0
    return (part.forward_s - part.ac_saved_s if how == "op" else part.forward_s), 1
