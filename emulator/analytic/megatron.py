"""Megatron-LM's communication overlaps, for the plan model (planner.cost's `overlap`): which of
the collectives the planner otherwise charges exposed a Megatron run hides behind its GEMMs.

    "tp"    TP communication overlap (Transformer Engine userbuffers, `tp_comm_overlap`): each
            tensor-parallel all-gather / reduce-scatter around a Linear is split into tp chunks
            and pipelined with the chunks of that Linear's GEMM (ring exchange), so only one
            chunk of it stays exposed, and the rest only where it outlasts the block's compute:
                exposed = max(collective / tp, collective - the block's compute (that pass))
            Megatron-Bridge's Llama 3 / 3.1 performance configs turn it on with a userbuffers
            preset for every TP layout (scripts/performance/configs/llama/llama3_llm_pretrain.py,
            llama31_llm_pretrain.py: `cfg.comm_overlap.tp_comm_overlap_cfg = userbuffers_...`).
    "p2p"   pipeline p2p overlap (`overlap_p2p_comm`): under the interleaved schedule the send and
            receive of a microbatch's activation run beside the next chunk's forward or backward;
            only what outlasts a chunk's compute (1 / v of the stage's microbatch) is exposed.
            Megatron-Bridge sets it whenever virtual pipeline stages are used, and batched p2p
            (no overlap) otherwise (https://docs.nvidia.com/nemo/megatron-bridge/latest/training/
            communication-overlap.html, "Pipeline-parallel Communication Overlap").
    "dp"    the distributed optimizer's overlapped gradient reduce-scatter and parameter all-gather
            (`overlap_grad_reduce`, `overlap_param_gather`, on whenever dp > 1 in Megatron-Bridge's
            and NeMo 2.0's CommOverlapConfig): chunked by the layers of a virtual pipeline stage
            under a pipeline, each chunk overlapped with the other chunks' compute, so one chunk of
            it stays exposed (same page, "Data-parallel Communication Overlap"). Without a
            pipeline, Megatron's buckets (bucket_bytes), the experts' among them (messages),
            hidden behind the last microbatch's backward (buckets); with a pipeline and no
            virtual stages the one chunk is all of it.

Not modelled: MoE dispatch / combine overlap (`overlap_moe_expert_parallel_comm`; Megatron-Bridge's
DeepSeek-V3 performance configs turn it on only for H100 at 1,024 GPUs, set_moe_a2a_overlap_overrides
in scripts/performance/configs/deepseek/deepseek_llm_pretrain.py, none of the validated rows).
"""

from __future__ import annotations

import math

from relay.analytic.footprint import check_fusion
from relay.errors import ConfigError

OVERLAPS = ("tp", "p2p", "dp")


def check(overlap, fusion: str = "eager") -> frozenset:
    """The overlaps as a frozenset, or a ConfigError naming the unknown one (or an unknown fusion
    mode, footprint.check_fusion) and the choices: before anything is measured."""
    check_fusion(fusion)
    out = frozenset((overlap,) if isinstance(overlap, str) else overlap or ())
    bad = sorted(out - set(OVERLAPS))
    if bad:
        raise ConfigError(f"overlap = {bad[0]!r} is unknown; choose among {', '.join(OVERLAPS)} (Megatron-LM's TP "
                          "communication overlap, its interleaved pipeline's p2p overlap, its distributed "
                          "optimizer's overlapped reduce-scatter and all-gather), or none")
    return out


def tensor_parallel(tp_fwd: dict, tp_bwd: dict, parts: dict, plan, overlap: frozenset) -> tuple[dict, dict]:
    """tensor_parallel.all_reduces' per-kind (exposed, compute) seconds, under TP comm overlap ("tp"
    in overlap) each kind's exposed all-reduces hidden behind its block's forward (backward)
    compute, all but a 1 / tp chunk of them."""
    if "tp" not in overlap or plan.tp == 1:
        return tp_fwd, tp_bwd
    tp = plan.tp

    def hide(per_kind: dict, compute_of) -> dict:
        return {k: (max(e / tp, e - compute_of(parts[k])) if k in parts else e, c) for k, (e, c) in per_kind.items()}

    return hide(tp_fwd, lambda p: p.forward_s), hide(tp_bwd, lambda p: p.backward_s)


def p2p(message_s: float, microbatch_compute_s: float, plan, overlap: frozenset) -> float:
    """Exposed seconds of one stage-to-stage message (and its gradient back): under interleaved
    p2p overlap ("p2p" in overlap, virtual stages) what outlasts one chunk's compute (the stage's
    microbatch compute over its virtual stages); otherwise all of it."""
    if "p2p" not in overlap or not plan.interleaved:
        return message_s
    return max(message_s - microbatch_compute_s / plan.n_stages, 0.0)


def data_parallel(exposed_s: float, plan, overlap: frozenset) -> float:
    """Exposed data-parallel seconds (planner._data_parallel's) under the distributed optimizer's
    overlap ("dp" in overlap; without FSDP, under an interleaved pipeline): one virtual stage's
    chunk of it."""
    if "dp" not in overlap or plan.fsdp or not plan.interleaved:
        return exposed_s
    return exposed_s / plan.n_stages


def buckets(experts_s: float, buckets_s: float, backward_s: float, last_s: float, overlap: frozenset) -> float:
    """Exposed seconds of a step's gradient sync without a pipeline (planner._data_parallel): the
    expert gradients' all-reduces (experts_s) and the dense gradients' buckets (buckets_s, the last
    one last_s), against one microbatch's backward (backward_s). Relay's runs sync the experts after
    the backward, exposed, and the buckets during it. Under the distributed optimizer's overlap
    ("dp"), Megatron's DDP keeps the expert gradients in buckets of their own, reduced over the
    expert data-parallel group as they fill, like the dense ones (`expert_parallel_buffers` and
    `expert_parallel_bucket_groups` beside `buffers` and `bucket_groups`, every group's sync started
    and finished together: megatron/core/distributed/distributed_data_parallel.py, Megatron-LM), so
    both hide behind the last microbatch's backward and only what outlasts it, or the last
    bucket, stays exposed."""
    if "dp" in overlap:
        return max(experts_s + buckets_s - backward_s, last_s)
    return experts_s + max(buckets_s - backward_s, last_s)


def bucket_bytes(default: float, dp: int, size: int, overlap: frozenset) -> float:
    """Bytes of a gradient bucket: Relay's runs' `default`, or under Megatron's overlapped
    gradient reduce ("dp") its DDP's default bucket of max(40,000,000, 1,000,000 x dp) parameters,
    "large enough to remain bandwidth-bound rather than latency-bound" (`ddp_config.bucket_size`
    in megatron/core/distributed/distributed_data_parallel.py, Megatron-LM), of `size` bytes each."""
    return max(40_000_000, 1_000_000 * dp) * size if "dp" in overlap else default


def messages(tensors: int, nbytes: float, dp: int, size: int, overlap: frozenset) -> int:
    """All-reduces that sync `tensors` expert gradient tensors of `nbytes` in all: one per tensor
    (Relay's runs), or under "dp" Megatron's buckets (bucket_bytes) of its expert buffers."""
    if "dp" not in overlap:
        return tensors
    return max(math.ceil(nbytes / bucket_bytes(0.0, dp, size, overlap)), 1)
