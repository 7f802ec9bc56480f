"""`relay plan`: the best parallel plans of a language model on a system (emulator/driver/
planner.py), or one plan's emulated step and memory (--parallel), checked against the HBM; with
--confirm K, the top K plans run as fake-tensor training (one device actor each) next to the
analytic figures."""

from __future__ import annotations

import time

from tabulate import tabulate

from relay import Cluster
from relay.analytic import deepep, planner, skew
from relay.analytic.footprint import GB, check, config_of
from relay.errors import ConfigError
from relay.kernels.attention import IMPLEMENTATIONS as ATTENTIONS
from relay.kernels.attention import words as attention_words
from relay.kernels.fusion import MODES as FUSIONS
from relay.launch.options import add_system_args, system_from
from relay.parallel import Parallel
from relay.trainer import TrainConfig
from relay.workloads.analytic import causal_share

CONFIRM_STEPS = 2  # fake-run steps per confirmed plan: the second is the steady one compared
CONFIRM_DEVICES = 16  # one device actor per device fits this host up to about this many
CONFIRM_HEADERS = ["#", "plan", "analytic step\n(emulated s)", "fake-run step\n(emulated s)", "run / analytic",
                   "run host time\n(real s)"]

MFU_NOTE = ("# MFU: model FLOPs per second over the BF16 peak; full attn. counts the whole s x s score square, "
            "causal halves the attention term (as a causal mask skips about half of it)")
HEADERS = ["#", "plan", "micro-batch\n(samples)", "step\n(emulated s)", "tokens/s\n(emulated)",
           "MFU, full attn.\n(emulated %)", "MFU, causal\n(emulated %)",
           "compute\n(emulated s)", "exposed TP\n(emulated s)", "pipeline bubble\n+ p2p (emulated s)",
           "expert all-to-all\n(emulated s)", "data-parallel\n(emulated s)", "peak memory / HBM\n(GB per device)"]


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="search the parallel plans of a model on a system (analytic, emulated)")
    add_system_args(p)
    p.add_argument("--workload", required=True, help="a language model: llama3-8b, llama3-70b, llama3-405b, "
                   "deepseek-v3, mixtral-8x7b, llama-debug, moe-debug")
    p.add_argument("--global-batch", type=int, help="samples per step (default: about 4M tokens, a multiple of "
                   "the device count)")
    p.add_argument("--seq-len", type=int, help="tokens per sample (default: the model's pre-training context)")
    p.add_argument("--precision", choices=("bf16", "fp8"), default="bf16", help="emulated compute precision: bf16, "
                   "or fp8 (torchao float8 training: Linear GEMMs in FP8, casts charged; chips with an FP8 peak)")
    p.add_argument("--fusion", choices=FUSIONS, default="eager", help="how the model's kernels are charged: eager "
                   "(default: a kernel per aten op, as eager PyTorch runs) or fused (each chain of memory-bound ops "
                   "one kernel, FP8 casts fused into their producers, as Megatron-LM with Transformer Engine or "
                   "torch.compile runs them; kernels/fusion.py)")
    p.add_argument("--attention", choices=ATTENTIONS, default="sdpa", help="the attention kernels charged: sdpa "
                   "(default: PyTorch's scaled_dot_product_attention, FlashAttention-2) or cudnn (as Transformer "
                   "Engine runs it on Hopper); at the catalog's published rate where the chip has one "
                   "(kernels/attention.py)")
    p.add_argument("--routing", help="MoE routing of the plans costed: balanced (default), zipf:S (S the Zipf "
                   "exponent) or a JSON file of token counts per expert; the step follows the busiest device")
    p.add_argument("--dispatch", choices=deepep.DISPATCHES, default="all_to_all", help="the MoE expert dispatch and "
                   "combine costed: all_to_all (default: a copy per token and expert, as Relay's runs send it) or "
                   "deepep (DeepEP's normal kernels: a token once per scale-up domain its experts are in, then over "
                   "the scale-up links to their ranks, under uniform routing; emulator/analytic/deepep.py)")
    p.add_argument("--top", type=int, default=5, help="plans to print (default 5)")
    p.add_argument("--parallel", help="cost this one plan instead of searching, e.g. tp=8,pp=4,dp=12,fsdp "
                   "(refused with its memory breakdown if it does not fit)")
    p.add_argument("--confirm", type=int, default=0, metavar="K", help="run the top K plans as fake-tensor "
                   f"training ({CONFIRM_STEPS} steps, one device actor per device; systems of up to "
                   f"{CONFIRM_DEVICES} devices) and print their emulated step next to the analytic one")
    p.set_defaults(fn=cmd_plan)


def run_plans(cluster: Cluster, workload: str, plans, global_batch: int, optimizer: str = "adamw",
              routing: str | None = None) -> list:
    """Each plan trained CONFIRM_STEPS steps on fake tensors on `cluster` (its system as
    configured): per plan the last step's row (step_s, compute_s, ..., emulated seconds), with
    host_s, the real seconds the run took. The runs move fp32 parameters and gradients and hold
    their model in fp32 (it is not cast): compare with the planner's message_bytes=4,
    model_dtype="fp32"."""
    out = []
    for plan in plans:
        start = time.perf_counter()
        res = cluster.train(workload, parallel=plan, steps=CONFIRM_STEPS, global_batch=global_batch,
                            tensors="fake", optimizer=optimizer, **({"routing": routing} if routing else {}))
        out.append({**res.steps[-1], "host_s": time.perf_counter() - start})
    return out


def confirm(system, workload: str, results: list, global_batch: int, dtype: str = "bf16",
            routing: str | None = None) -> None:
    """Prints the analytic and the fake-run step of each PlanResult in `results`."""
    if system.devices > CONFIRM_DEVICES and "shared" not in TrainConfig.__dataclass_fields__:
        print(f"# --confirm: {system.devices} devices need the shared fake runs (one process per distinct role); "
              f"one actor per device fits this host up to {CONFIRM_DEVICES} devices; confirmation skipped")
        return
    start = time.perf_counter()
    with Cluster(system, tensors="fake", dtype=dtype) as cluster:
        runs = run_plans(cluster, workload, [r.plan for r in results], global_batch, routing=routing)
    rows = [[i + 1, str(r.plan), f"{r.step_s:.4g}", f"{x['step_s']:.4g}", f"{x['step_s'] / r.step_s:.3f}",
             f"{x['host_s']:.1f}"] for i, (r, x) in enumerate(zip(results, runs))]
    print(f"# confirmed by fake-tensor runs ({CONFIRM_STEPS} steps, the last compared; every plan's messages at "
          "fp32 and its blocks measured in fp32, as the runs move and hold them):")
    print(tabulate(rows, headers=CONFIRM_HEADERS, disable_numparse=True))
    best = min(range(len(runs)), key=lambda i: runs[i]["step_s"])
    print(f"# fastest by the runs: plan {best + 1} ({results[best].plan}); confirmation took "
          f"{time.perf_counter() - start:.1f} real s")


def row(i, r: planner.PlanResult, causal: float = 1.0) -> list:
    """One plan's row; `causal`: model FLOPs with causal attention over those without (the causal MFU's factor)."""
    b = r.breakdown
    return [i, str(r.plan), r.micro_batch, f"{r.step_s:.3f}", f"{r.tokens_per_s:,.0f}", f"{100 * r.mfu:.1f}",
            f"{100 * r.mfu * causal:.1f}",
            f"{b.compute:.3f}", f"{b.tensor_parallel:.3f}", f"{b.pipeline:.3f}", f"{b.expert_all_to_all:.3f}",
            f"{b.data_parallel:.3f}", f"{r.memory.total / GB:.1f} / {r.memory.capacity / GB:.0f}"]


def cmd_plan(args) -> int:
    system = system_from(args)
    for chip in set(system.chips):  # fp8 on a chip without it: refused before anything is measured
        chip.peak_flops(args.precision)
    skew.parse(args.routing)  # refused before anything is measured
    if args.top < 1:
        raise ConfigError(f"--top = {args.top} is invalid; give a number of plans >= 1")
    if args.confirm < 0 or (args.confirm and args.parallel):
        raise ConfigError(f"--confirm = {args.confirm} is invalid; give a number of plans >= 0 to run after a "
                          "search (not with --parallel)")
    if args.confirm and args.attention != "sdpa":
        raise ConfigError(f"--confirm with --attention = {args.attention!r}: the fake-tensor runs charge PyTorch's "
                          "SDPA kernels ('sdpa'); drop --confirm or --attention")
    if args.dispatch != "all_to_all" and (args.confirm or skew.parse(args.routing) is not None):
        other = "--confirm" if args.confirm else "--routing"
        raise ConfigError(f"--dispatch = {args.dispatch!r} with {other}: the fake-tensor runs and the routing skew "
                          f"send the runs' all-to-all (a copy per token and expert); drop --dispatch or {other}")
    if args.confirm and args.fusion != "eager":
        raise ConfigError(f"--confirm with --fusion = {args.fusion!r}: the fake-tensor runs charge eager kernels "
                          "(fusion is modelled in the plan search only); drop --confirm or --fusion")
    if args.confirm and args.seq_len not in (None, config_of(args.workload).seq_len):
        raise ConfigError(f"--confirm with --seq-len = {args.seq_len}: the runs train the model at its own "
                          f"sequence length ({config_of(args.workload).seq_len}); drop --seq-len or --confirm")
    batch = args.global_batch
    if batch is None:
        batch = planner.default_batch(args.workload, system.devices, args.seq_len)
    elif batch < 1:
        raise ConfigError(f"--global-batch = {batch} is invalid; give a number of samples >= 1")
    tokens = batch * config_of(args.workload, args.seq_len).seq_len
    share = causal_share(config_of(args.workload, args.seq_len))
    print(f"# relay plan: {args.workload} on {system.describe()}, global batch {batch} samples "
          f"({tokens:,} tokens), {args.precision}, {args.fusion} kernels, "
          f"{attention_words(system.chip, args.attention)}, "
          f"{args.routing or 'balanced'} routing, {args.dispatch} expert dispatch"
          + (" (under uniform routing)" if args.dispatch == "deepep" else "") + "; "
          "analytic model, every "
          "figure emulated"
          + ("; messages at fp32 (4 bytes per element) and the blocks measured in fp32 (model_dtype='fp32'), as "
             "the fake-tensor runs of --confirm move and hold them" if args.confirm else ""))
    if args.parallel:
        plan = Parallel.parse(args.parallel)
        if batch % plan.dp:
            raise ConfigError(f"--global-batch = {batch} is not a multiple of dp = {plan.dp}; give a batch that "
                              "every replica gets an equal share of")
        plan.check(system.devices, system.domain, config_of(args.workload, args.seq_len), batch // plan.dp)
        fp = check(args.workload, plan, batch, system.chip.name, seq_len=args.seq_len, dtype=args.precision,
                   fusion=args.fusion, attention=args.attention)
        r = skew.cost(system, args.workload, plan, batch, args.routing, fp, seq_len=args.seq_len, dtype=args.precision,
                      fusion=args.fusion, attention=args.attention, dispatch=args.dispatch)
        print(tabulate([row(1, r, share)], headers=HEADERS, disable_numparse=True))
        print(MFU_NOTE)
        print(f"# memory (most loaded device): {fp.describe()}")
        if plan.sp:
            print("# sp: the norms and residual adds on 1 / tp of the sequence (their time and what they save); its "
                  "communication as tensor parallel's all-reduces (an all-gather and a reduce-scatter move the bytes "
                  "of one all-reduce)")
        return 0
    # the runs --confirm compares with move fp32 messages and hold their model in fp32 (it is not cast)
    found = skew.search(system, args.workload, batch, args.routing, top=max(args.top, args.confirm),
                        seq_len=args.seq_len, message_bytes=4 if args.confirm else None, dtype=args.precision,
                        fusion=args.fusion, attention=args.attention, dispatch=args.dispatch,
                        model_dtype="fp32" if args.confirm else "emulated")
    if not found.results:
        raise ConfigError(f"no plan of {args.workload} fits {system.devices} x {system.chip.name} at global "
                                  f"batch {batch} ({found.considered} considered, all over the HBM); use more "
                                  "devices, a smaller --global-batch or a shorter --seq-len")
    print(tabulate([row(i + 1, r, share) for i, r in enumerate(found.results[:args.top])], headers=HEADERS,
                   disable_numparse=True))
    print(MFU_NOTE)
    print(f"# memory of plan 1 (most loaded device): {found.results[0].memory.describe()}")
    print(f"# {found.considered} valid plans considered, {found.pruned_memory} pruned by memory, "
          f"{found.considered - found.pruned_memory} costed; search took {found.host_s:.1f} real s")
    if args.confirm:
        confirm(system, args.workload, found.results[:args.confirm], batch, args.precision, args.routing)
    return 0
