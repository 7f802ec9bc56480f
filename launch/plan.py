"""`relay plan`: the best parallel plans of a language model on a system (emulator/driver/
planner.py), or one plan's emulated step and memory (--parallel), checked against the HBM."""

from __future__ import annotations

from tabulate import tabulate

from emulator.device.footprint import GB, check, config_of
from emulator.driver import planner
from emulator.errors import ConfigError
from emulator.parallel import Parallel
from launch.options import add_system_args, system_from

HEADERS = ["#", "plan", "micro-batch\n(samples)", "step\n(emulated s)", "tokens/s\n(emulated)", "MFU\n(emulated %)",
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
    p.add_argument("--top", type=int, default=5, help="plans to print (default 5)")
    p.add_argument("--parallel", help="cost this one plan instead of searching, e.g. tp=8,pp=4,dp=12,fsdp "
                   "(refused with its memory breakdown if it does not fit)")
    p.set_defaults(fn=cmd_plan)


def row(i, r: planner.PlanResult) -> list:
    b = r.breakdown
    return [i, str(r.plan), r.micro_batch, f"{r.step_s:.3f}", f"{r.tokens_per_s:,.0f}", f"{100 * r.mfu:.1f}",
            f"{b.compute:.3f}", f"{b.tensor_parallel:.3f}", f"{b.pipeline:.3f}", f"{b.expert_all_to_all:.3f}",
            f"{b.data_parallel:.3f}", f"{r.memory.total / GB:.1f} / {r.memory.capacity / GB:.0f}"]


def cmd_plan(args) -> int:
    system = system_from(args)
    if args.top < 1:
        raise ConfigError(f"--top = {args.top} is invalid; give a number of plans >= 1")
    batch = args.global_batch
    if batch is None:
        batch = planner.default_batch(args.workload, system.devices, args.seq_len)
    elif batch < 1:
        raise ConfigError(f"--global-batch = {batch} is invalid; give a number of samples >= 1")
    tokens = batch * config_of(args.workload, args.seq_len).seq_len
    print(f"# relay plan: {args.workload} on {system.describe()}, global batch {batch} samples "
          f"({tokens:,} tokens); analytic model, every figure emulated")
    if args.parallel:
        plan = Parallel.parse(args.parallel)
        if batch % plan.dp:
            raise ConfigError(f"--global-batch = {batch} is not a multiple of dp = {plan.dp}; give a batch that "
                              "every replica gets an equal share of")
        plan.check(system.devices, system.domain, config_of(args.workload, args.seq_len), batch // plan.dp)
        fp = check(args.workload, plan, batch, system.chip.name, seq_len=args.seq_len)
        r = planner.cost(system, args.workload, plan, batch, fp, seq_len=args.seq_len)
        print(tabulate([row(1, r)], headers=HEADERS, disable_numparse=True))
        print(f"# memory (most loaded device): {fp.describe()}")
        return 0
    found = planner.search(system, args.workload, batch, top=args.top, seq_len=args.seq_len)
    if not found.results:
        raise ConfigError(f"no plan of {args.workload} fits {system.devices} x {system.chip.name} at global "
                                  f"batch {batch} ({found.considered} considered, all over the HBM); use more "
                                  "devices, a smaller --global-batch or a shorter --seq-len")
    print(tabulate([row(i + 1, r) for i, r in enumerate(found.results)], headers=HEADERS, disable_numparse=True))
    print(f"# memory of plan 1 (most loaded device): {found.results[0].memory.describe()}")
    print(f"# {found.considered} valid plans considered, {found.pruned_memory} pruned by memory, "
          f"{found.considered - found.pruned_memory} costed; search took {found.host_s:.1f} real s")
    return 0
