"""What each framework of `relay validate --training`'s rows runs that the plan model can cost:
its kernels' fusion (kernels/fusion.py) and Megatron's communication overlaps
(analytic/megatron.py), from a row's `framework` and `extras` (emulator/hardware/training.toml).

    megatron-core   Megatron-Bridge, NeMo 2.0: Transformer Engine's fused kernels; TP comm overlap
                    (its performance configs' userbuffers presets), interleaved p2p overlap and
                    the distributed optimizer's overlapped reduce-scatter / all-gather (its
                    CommOverlapConfig: overlap_p2p_comm with virtual stages, overlap_grad_reduce
                    and overlap_param_gather with dp > 1)
    automodel       NeMo AutoModel: FSDP2 over Transformer Engine layers, eager PyTorch around them
                    (its DeepSeek-V3 configs name no torch.compile), fused where the row's extras
                    list torch.compile (its Llama 3 70B config)
    torchtitan      eager PyTorch, fused only where the row's extras list torch.compile
    meta            the Llama 3 paper's own framework: nothing published to cost, eager
Their attention kernels (kernels/attention.py): Transformer Engine's DotProductAttention prefers its
FusedAttention (cuDNN) backend on Hopper and newer GPUs when FlashAttention also qualifies (Transformer
Engine documentation, "Attention Backend Selection"), so Megatron-Core and the rows whose extras list
exactly "Transformer Engine" (TE's layers with its attention: AutoModel's DeepSeek-V3 configs,
backend attn: te) run cuDNN attention;
torchtitan and the rest call PyTorch's scaled_dot_product_attention, whose flash backend is
FlashAttention-2 ("sdpa"), as AutoModel's Llama 3 70B CP row does (attn_implementation: sdpa,
"required for cp>1", with Transformer Engine's Linear alone: its extras say so).
"""

from __future__ import annotations

FRAMEWORKS = {"megatron-core": ("fused", ("tp", "p2p", "dp")), "automodel": ("eager", ()),
              "torchtitan": ("eager", ()), "meta": ("eager", ())}
COMPILED = "torch.compile"  # an extra that makes an eager framework's row fused
FUSED_EXTRAS = (COMPILED, "Transformer Engine")  # extras the fused mode stands for
ASYNC_P2P = "asynchronous pipeline p2p"  # an extra the plan model costs (planner.cost's async_p2p)
# frameworks whose tensor parallelism runs sequence parallel: torchtitan's apply_tp puts the norms on
# SequenceParallel unconditionally (models/llama/parallelize_llama.py), the Llama 3 paper's TP is
# Korthikanti et al.'s, and Megatron-Bridge's TP comm overlap (costed on its rows) is gated on it
# (docs.nvidia.com/nemo/megatron-bridge/latest/skills/perf-techniques/tp-dp-comm-overlap/SKILL.html)
SEQUENCE_PARALLEL = ("torchtitan", "meta", "megatron-core")
# of those, the ones whose sequence parallel keeps shards of the column-wise layers' inputs and gathers
# them again in backward (Megatron's LinearWithGradAccumulationAndAsyncCommunication; Korthikanti et
# al.'s, whom the Llama 3 paper cites); torchtitan's DTensor keeps them gathered (analytic/activations.py)
REGATHER = ("meta", "megatron-core")
TE_ATTENTION = "Transformer Engine"  # an extra whose attention runs TE's (cuDNN on Hopper) instead of torch's SDPA
TE_LAYERS = "Transformer Engine"  # the start of every extra naming TE's layers (its attention or not)
DEEPEP = "DeepEP"  # an extra the plan model costs: the expert dispatch as DeepEP's kernels (analytic/deepep.py)
GROUPED_GATE = "fake balanced gate"  # AutoModel's: a token's experts contiguous (deepep's "grouped" routing)
MODELLED = ("balanced routing", "token-dropless", ASYNC_P2P, DEEPEP)  # extras the plan model assumes or costs


def attention_of(row) -> str:
    """The attention kernels a TrainingRow's framework runs (kernels/attention.py's implementations)."""
    return "cudnn" if row.framework == "megatron-core" or TE_ATTENTION in row.extras else "sdpa"


def dispatch_of(row) -> tuple[dict, list[str]]:
    """(planner.cost's dispatch and routing, approximations) of a TrainingRow's expert dispatch."""
    if DEEPEP not in row.extras:
        return {"dispatch": "all_to_all"}, []
    routing = "grouped" if any(GROUPED_GATE in e for e in row.extras) else "uniform"
    return {"dispatch": "deepep", "routing": routing}, [
        f"DeepEP costed as a copy per domain a token reaches ({routing} routing: analytic/deepep.py), without the "
        "SMs its kernels take from compute"]


def planner_kw(row) -> dict:
    """planner.cost's keywords for what a TrainingRow's run does beyond its layout and kernels."""
    return {"async_p2p": ASYNC_P2P in row.extras, "schedules": row.schedules, **dispatch_of(row)[0]}


def plan_words(row, dp: int) -> tuple[bool, bool]:
    """(dist_opt, sp) of a TrainingRow's plan: Megatron (Megatron-Bridge, NeMo) runs its distributed
    optimizer (ZeRO-1) by default; sequence parallel as SEQUENCE_PARALLEL says."""
    return (row.framework == "megatron-core" and not row.fsdp and dp > 1,
            row.tp > 1 and row.framework in SEQUENCE_PARALLEL)


def kernels_of(row) -> tuple[str, tuple, list[str]]:
    """(fusion, overlaps, approximations) of a TrainingRow: what Relay costs it with (its expert
    dispatch's too) and, in words, what that leaves out."""
    fusion, overlap = FRAMEWORKS[row.framework]
    fusion = "fused" if COMPILED in row.extras else fusion
    out = []
    if fusion == "fused":
        out.append("fused kernels run as Relay's fused chains (kernels/fusion.py: one launch per chain of memory-bound "
                   "ops, fp8 casts fused into their producers, fp8 weights cast once a step), without CUDA graphs "
                   "and with eager's saved activations")
    elif any(e.startswith(TE_LAYERS) for e in row.extras):
        out.append("Transformer Engine's layers in an eager model: its fused RMSNorm charged as torch's kernels (an "
                   "over-charge), the model's other memory-bound ops (rotary, split / cat, residual adds) one kernel "
                   "each, as the config runs them (no torch.compile)")
    if overlap and (row.tp > 1 or row.stages > 1):
        out.append("Megatron's TP comm, interleaved p2p and distributed-optimizer overlaps costed "
                   "(analytic/megatron.py)")
    return fusion, overlap, out + dispatch_of(row)[1]
