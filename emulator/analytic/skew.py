"""Routing skew in the plan search: a MoE plan's step when the router does not spread tokens
evenly over the experts, from the same routing models the fake runs take (workloads/routing.py:
balanced, zipf:S, a JSON of counts per expert).

Under expert parallelism (ep > 1) device r holds experts [r E / ep, (r + 1) E / ep) and every
peer routes its tokens by the same model, so device r receives ep x (its experts' share of one
device's choices) pairs (device/training/experts.py). Balanced, that is one device's own choices,
R = micro-batch x sequence x top_k; skewed, the hottest device gets f R with

    f = ep x max_r (choices of device r's experts) / choices   (>= 1; 1 when balanced),

per MoE layer. The layer's combine all-to-all cannot finish before the hottest device's experts
have run and its bytes have moved, so every device waits for it: the step follows the hottest
device. On top of `planner.cost` (the balanced plan), per MoE layer and microbatch:
    compute      the hottest device's expert path (its two permutations, three grouped GEMMs and
                 the SwiGLU, forward; their gradients backward) at f R rows less the same at R,
                 priced by the cost model on meta tensors as the fake run charges them (the
                 forward again as the plan recomputes it)
    all-to-all   each of the 2 forward and 2 backward all-to-alls (and the recomputed ones) moves
                 f times the balanced bytes into the hottest device: predicted at f x the bytes
    pipeline     the bubble, (pp - 1) x the slowest microbatch / v, grows with both
With pipeline stages the stage with the most MoE layers takes the extra (the slowest stage under
skew). Without expert parallelism (ep = 1) every expert is on every device and the rows per
device do not change: no effect.
"""

from __future__ import annotations

import functools
import time
from dataclasses import replace

import torch

from relay.analytic import activations, planner
from relay.analytic.footprint import config_of, fitting, measure, stage_layers
from relay.errors import ConfigError
from relay.kernels.cost import CostModel
from relay.workloads import routing as routings

_OPS = torch.ops.relay


def parse(spec):
    """A routing model from `--routing` (routing.parse), refusing bad input as ConfigError; None
    for balanced routing (no skew to add)."""
    try:
        model = routings.parse(spec)
    except ValueError as e:
        raise ConfigError(f"--routing: {e}") from None
    return None if model == routings.balanced() else model


def hot_factors(model, c, ep: int, choices: int) -> list[float]:
    """Per MoE layer, f: the hottest expert-parallel device's pairs over the balanced share."""
    local, out = c.n_experts // ep, []
    for layer in range(c.n_layers - getattr(c, "n_dense_layers", 0)):
        counts = model.counts(layer, choices, c.n_experts, c.top_k)
        out.append(ep * max(sum(counts[r * local:(r + 1) * local]) for r in range(ep)) / choices)
    return out


@functools.lru_cache(maxsize=1024)
def expert_path_s(chip, dtype: str, rows: int, dim: int, hidden: int, local: int) -> tuple[float, float]:
    """(Forward, backward) emulated seconds of one device's expert path over `rows` pairs and
    `local` experts, each op priced by the cost model as the fake run charges it."""
    model = CostModel(chip, dtype)
    meta = functools.partial(torch.empty, device="meta")
    counts = [rows // local + (e < rows % local) for e in range(local)]
    x, idx = meta(rows, dim), meta(rows, dtype=torch.long)
    w13, w2 = [meta(hidden, dim) for _ in range(local)], [meta(dim, hidden) for _ in range(local)]
    g, h = meta(rows, hidden), meta(rows, hidden)

    def s(op, *args):
        return model.op_cost(op.default, args, None, op.default(*args)).seconds

    fwd = 2 * s(_OPS.permute, x, idx) + 2 * s(_OPS.grouped_mm, x, w13, counts) + \
        s(_OPS.swiglu, g, g, counts) + s(_OPS.grouped_mm, h, w2, counts)
    bwd = 2 * s(_OPS.permute_backward, x, idx, rows) + s(_OPS.swiglu_backward, h, g, g, counts) + \
        2 * (s(_OPS.grouped_mm_dx, g, w13, counts) + s(_OPS.grouped_mm_dw, g, x, counts)) + \
        s(_OPS.grouped_mm_dx, x, w2, counts) + s(_OPS.grouped_mm_dw, x, h, counts)
    return fwd, bwd


def cost(system, workload: str, plan, global_batch: int, routing=None, memory=None, *, dtype: str = "bf16",
         optimizer: str = "adamw", seq_len: int | None = None, message_bytes: int | None = None,
         fusion: str = "eager", attention: str = "sdpa", model_dtype: str = "emulated",
         dispatch: str = "all_to_all"):
    """planner.cost with `routing` (a routing model or its text; None or balanced: the same); a skewed
    routing's hot experts costed over the runs' all-to-all (dispatch "all_to_all" only)."""
    model = parse(routing)
    _refuse_deepep(model, routing, dispatch)
    base = planner.cost(system, workload, plan, global_batch, memory, dtype=dtype, optimizer=optimizer,
                        seq_len=seq_len, message_bytes=message_bytes, fusion=fusion, attention=attention,
                        model_dtype=model_dtype, dispatch=dispatch)
    c = config_of(workload, seq_len)
    if model is None or plan.ep == 1 or not hasattr(c, "n_experts"):
        return base
    m, mb = plan.n_microbatches, base.micro_batch
    rows = mb * c.seq_len * c.top_k  # one device's choices per microbatch
    factors = hot_factors(model, c, plan.ep, rows)
    if max(factors) <= 1.0:
        return base
    chip = system.chip
    balanced = expert_path_s(chip, dtype, rows, c.dim, c.expert_dim, c.n_experts // plan.ep)
    part = measure(workload, plan.tp, plan.ep, mb, chip.name, dtype=dtype, optimizer=optimizer, seq_len=seq_len,
                   fusion=fusion, attention=attention, sp=plan.sp, model_dtype=model_dtype).parts["moe"]
    routed = rows * c.dim * (message_bytes or {"fp32": 4}.get(dtype, 2))
    a2a = planner._collective(system, plan, "ep", "all_to_all", routed)
    dense = getattr(c, "n_dense_layers", 0)
    stages = [[i - dense for i in stage_layers(c.n_layers, plan.pp, s) if i >= dense] for s in range(plan.pp)]
    extra_c = extra_e = 0.0
    for i in max(stages, key=len):  # per microbatch, on the stage with the most MoE layers
        f = factors[i]
        if f <= 1.0:
            continue
        fwd, bwd = expert_path_s(chip, dtype, round(f * rows), c.dim, c.expert_dim, c.n_experts // plan.ep)
        again, r = activations.rerun(plan, dense + i, part)
        extra_c += (1 + again / part.forward_s) * (fwd - balanced[0]) + (bwd - balanced[1])
        extra_e += (2 + r) * 2 * (planner._collective(system, plan, "ep", "all_to_all", f * routed) - a2a)
    bd = base.breakdown
    bd = replace(bd, compute=bd.compute + m * extra_c, expert_all_to_all=bd.expert_all_to_all + m * extra_e,
                 pipeline=bd.pipeline + (plan.pp - 1) * (extra_c + extra_e) / plan.n_stages)
    step = bd.total
    return replace(base, breakdown=bd, step_s=step, tokens_per_s=base.tokens_per_s * base.step_s / step,
                   mfu=base.mfu * base.step_s / step)


def _refuse_deepep(model, routing, dispatch: str) -> None:
    if model is not None and dispatch != "all_to_all":
        raise ConfigError(f"dispatch = {dispatch!r} with routing {routing!r}: the skew's all-to-all is the runs' "
                          "(a copy per token and expert); give dispatch all_to_all, or balanced routing")


def search(system, workload: str, global_batch: int, routing=None, top: int = 5, **kw) -> planner.Search:
    """planner.search with `routing`: the same plans and memory pruning, ranked by `cost`."""
    model = parse(routing)
    _refuse_deepep(model, routing, kw.get("dispatch", "all_to_all"))  # (before any plan is measured)
    if model is None:
        return planner.search(system, workload, global_batch, top=top, **kw)
    start = time.perf_counter()
    chip, considered, fits = system.chip.name, 0, []
    mem = {k: kw[k] for k in ("dtype", "optimizer", "seq_len", "fusion", "attention", "model_dtype") if k in kw}
    for p in planner.plans(system, workload, global_batch, kw.get("seq_len")):
        considered += 1
        fp = fitting(workload, p, global_batch, chip, **mem)
        if fp is not None:
            fits.append(cost(system, workload, p, global_batch, routing, fp, **kw))
    results = sorted(fits, key=lambda r: r.step_s)
    return planner.Search(results[:top], considered, considered - len(fits), global_batch,
                          time.perf_counter() - start)
