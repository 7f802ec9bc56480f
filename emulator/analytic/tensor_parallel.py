"""The tensor-parallel all-reduces of a plan's step, as DTensor runs plans.py's plan (counted with
CommDebugMode on torch's fake process group: tests/unit/test_plan.py), in emulated seconds."""

from __future__ import annotations

FUNCOL_KERNELS = 1  # per functional all-reduce (DTensor's): its clone of the input; the others launch none
KINDS = ("dense", "moe", "embedding", "head")  # a block of each kind, and the vocabulary's two ends


def all_reduces(plan, c, mb: int, size: int, kernels, coll) -> tuple[dict, dict]:
    """Per kind (KINDS), the (exposed seconds, compute seconds) of the tensor-parallel all-reduces
    of one microbatch (mb samples), forward and backward. A block: forward, one after the row-wise
    wo and one after w2 (dense blocks only: experts are not split); backward, one per column-wise
    layer for its input's gradient: wq, wk, wv (s b d each) or MLA's wq_b, wkv_b (the two latents)
    and its shared rotary key, and w1, w3 (dense blocks), of which the last of each group is
    exposed. The vocabulary (plans.vocab_parallel): the embedding's output forward (stage 0; its
    backward's compute, the whole gradient's rows past its share); the head's input gradient
    backward and loss_parallel's 3 of one fp32 number per token (max, sum of exponentials, target
    logit) forward (the last stage), exposed. Compute: the FUNCOL_KERNELS the cost model charges
    per functional all-reduce. `size`: bytes per element of a message; `kernels`:
    planner._Kernels; `coll(dim, primitive, bytes)`: one collective's seconds."""
    if plan.tp == 1:
        return ({k: (0.0, 0.0) for k in KINDS},) * 2
    tokens = mb * c.seq_len  # elements per unit of width

    def ar(*widths):
        return (sum(coll("tp", "all_reduce", tokens * w * size) for w in widths),
                sum(kernels.seconds(FUNCOL_KERNELS, 2 * FUNCOL_KERNELS * tokens * w) for w in widths))

    mla = getattr(c, "attention", "gqa") == "mla"
    attn = (c.q_lora_rank, c.kv_lora_rank, c.qk_rope_dim) if mla else (c.dim,) * 3

    def bwd(*groups):  # waited for after the next layer's gradient GEMMs: the last of a group exposed
        return sum(ar(g[-1])[0] for g in groups), sum(ar(*g)[1] for g in groups)

    loss = (3 * coll("tp", "all_reduce", 4 * tokens), 0.0)
    # DTensor's embedding backward makes the whole weight's gradient (plans._own_rows): the rows past
    # the device's share, beyond the base's measurement (vocab / tp rows)
    rows = kernels.seconds(1, c.vocab_size * c.dim) - kernels.seconds(1, c.vocab_size // plan.tp * c.dim)
    return ({"dense": ar(c.dim, c.dim), "moe": ar(c.dim), "embedding": ar(c.dim), "head": loss},
            {"dense": bwd(attn, (c.dim, c.dim)), "moe": bwd(attn), "embedding": (0.0, rows), "head": ar(c.dim)})
