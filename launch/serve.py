"""`relay serve`: a language model served on a system (emulator/analytic/serving.py): one layout's
emulated prefill and decode throughput per device, TTFT, TPOT and memory per device (--parallel);
the best layouts under latency targets (--search, --tpot-ms, --ttft-ms); or the serving
break-even of this system against a faster one at equal targets (--breakeven FAST). With --mtp
ACCEPTANCE, decode runs one multi-token prediction draft a step (emulator/analytic/mtp.py)."""

from __future__ import annotations

import time

from tabulate import tabulate

from relay.analytic import dispatch, mtp, serving, serving_search
from relay.analytic.serving import PRECISIONS, Layout, config_of
from relay.errors import ConfigError
from relay.hardware.chips import DTYPE_PEAK
from relay.hardware.system import System
from relay.kernels.graphs import GRAPH_LAUNCH_US
from relay.launch.options import add_system_args, system_from

GB = 1e9
BATCH = 64  # decode sequences per replica, by default
HEADERS = ["phase", "layout", "batch\n(sequences\nper replica)", "micro-\nbatches", "TTFT / TPOT\n(emulated ms)",
           "tokens/s per device\n(emulated)", "compute\n(emulated ms)", "TP all-reduce\n(emulated ms)",
           "dispatch+combine\n(emulated ms)", "memory / HBM\n(GB per device)"]


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a language model: prefill and decode throughput, TTFT, TPOT and memory "
                       "per device (analytic, emulated)")
    add_system_args(p)
    p.add_argument("--workload", required=True, help="a language model: llama3-8b, llama3-70b, llama3-405b, "
                   "deepseek-v3, mixtral-8x7b, llama-debug, moe-debug")
    p.add_argument("--input-len", type=int, default=4096, help="prompt tokens per request (default 4096)")
    p.add_argument("--output-len", type=int, default=1024, help="generated tokens per request (default 1024)")
    p.add_argument("--batch", type=int, help=f"sequences per replica in a decode step (default {BATCH})")
    p.add_argument("--prefill-batch", type=int, help="prompts per replica in a prefill step (default: "
                   f"{serving.PREFILL_TOKENS} tokens' worth, at least 1)")
    p.add_argument("--parallel", help="the layout, e.g. dp=72,tp=1,ep=72 (missing: dp = devices / tp, tp = 1, "
                   "ep = devices for MoE models, 1 for dense ones)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="bf16", help="weights and GEMMs: bf16, fp8 "
                   "(weights quantised ahead of serving, Linear GEMMs at the FP8 peak; chips with FP8) or int8 "
                   "(W8A8: INT8 weights, Linear and expert GEMMs at the INT8 peak, tokens dispatched in INT8, as "
                   "CloudMatrix-Infer serves on the 910C; chips with an INT8 peak)")
    p.add_argument("--no-overlap", action="store_true", help="one micro-batch: charge the expert all-to-all after "
                   "the compute (default: two micro-batches overlapping it where that is faster)")
    p.add_argument("--routing", choices=dispatch.ROUTINGS, default="balanced", help="how a device's (token, expert) "
                   "rows fall on the ep devices, which sets the peers a dispatch messages: balanced (spread evenly, "
                   "as the device runs do; default) or uniform (random experts: fewer peers at large batches)")
    p.add_argument("--eager-decode", action="store_true", help="run decode eagerly, every kernel paying the "
                   "catalog's launch_us (default: decode replayed as a captured graph, as SGLang, vLLM and Ascend's "
                   "graph mode serve it, kernels/graphs.py; prefill is eager either way)")
    p.add_argument("--search", action="store_true", help="search the layouts and batches under --tpot-ms / --ttft-ms")
    p.add_argument("--tpot-ms", type=float, help="decode latency target: time per output token, ms")
    p.add_argument("--ttft-ms", type=float, help="prefill latency target: time to first token, ms")
    p.add_argument("--breakeven", metavar="FAST", help="a faster system preset (e.g. nvl72): how many of this "
                   "system's devices match its whole throughput at the same latency targets")
    p.add_argument("--fast-precision", choices=tuple(PRECISIONS), help="with --breakeven: the fast side's "
                   "precision (default --precision)")
    p.add_argument("--shared", nargs="?", const="decode", choices=("decode", "prefill", "both"),
                   help="also run the step (default decode) on the emulated devices, fake tensors at full size, as "
                   "a shared run (one worker records the one role, every device replayed: driver/serving.py), and "
                   "print it beside the analytic step (tp=1, bf16)")
    p.add_argument("--mtp", type=float, metavar="ACCEPTANCE", help="decode with DeepSeek-V3's multi-token "
                   "prediction: each step verifies one draft token per sequence, accepted this fraction of the time "
                   "(e.g. 0.7, CloudMatrix-Infer's; DeepSeek-V3's report: 0.85-0.9); default: no MTP")
    p.set_defaults(fn=cmd_serve)


def _check(args, system) -> None:
    config_of(args.workload, 1)  # a language model, or refused
    for name in ("input_len", "output_len", "batch", "prefill_batch"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} = {v} is invalid; give a count >= 1")
    system.chip.peak_flops(args.precision)  # fp8 or int8 on a chip without it: refused here
    given = [flag for flag, v in (("--parallel", args.parallel), ("--batch", args.batch),
                                  ("--prefill-batch", args.prefill_batch), ("--no-overlap", args.no_overlap)) if v]
    if (args.search or args.breakeven) and given:
        raise ConfigError(f"{', '.join(given)}: --search and --breakeven choose the layout and both batches and "
                          "overlap the expert all-to-all themselves; drop " + ("them" if len(given) > 1 else "it"))
    if args.fast_precision and not args.breakeven:
        raise ConfigError(f"--fast-precision = {args.fast_precision!r} is the fast side's precision of --breakeven "
                          "FAST; add --breakeven FAST or drop it")
    if args.shared and (args.search or args.breakeven or args.precision != "bf16"):
        raise ConfigError(f"--shared runs one layout's step on the devices in bf16; drop --search / --breakeven "
                          f"(and --precision {args.precision}) or drop --shared")
    if args.shared and args.routing != "balanced":
        raise ConfigError(f"--routing {args.routing} with --shared: the devices route balanced (every device the same "
                          "work, so one role replays all); drop --routing or drop --shared")
    mtp.check(args.workload, args.mtp)
    if args.mtp is not None and args.breakeven:
        raise ConfigError(f"--mtp {args.mtp:g} with --breakeven: the break-even compares the systems as their "
                          "serving sources run both, without MTP; drop --breakeven or drop --mtp")
    if (args.tpot_ms or args.ttft_ms) and not (args.search or args.breakeven):
        raise ConfigError("--tpot-ms / --ttft-ms are targets of a search; add --search (or --breakeven FAST)")


def _memory(s) -> str:
    m = s.memory
    return f"{m['total'] / GB:.1f} / {m['hbm'] / GB:.0f}"


def rows(s, phases=("prefill", "decode")) -> list:
    out = []
    for ph in phases:
        p = getattr(s, ph)
        batch = s.prefill_batch if ph == "prefill" else s.batch
        latency = s.ttft_s if ph == "prefill" else s.tpot_s
        tps = s.prefill_tps if ph == "prefill" else s.decode_tps
        out.append([ph, str(s.layout), batch, p.micro, f"{latency * 1e3:.2f}", f"{tps:,.0f}",
                    f"{p.compute_s * 1e3:.2f}", f"{p.tp_s * 1e3:.2f}", f"{p.a2a_s * 1e3:.2f}", _memory(s)])
    return out


def _describe_memory(s) -> str:
    m = s.memory
    return (f"weights {m['weights'] / GB:.1f} + KV cache {m['kv_cache'] / GB:.1f} + activations "
            f"{m['activations'] / GB:.1f} = {m['total'] / GB:.1f} GB of {m['hbm'] / GB:.0f} GB HBM"
            + ("" if s.fits else " (does NOT fit)"))


def _print_best(title: str, best) -> None:
    found = [r for ph in ("prefill", "decode") if getattr(best, ph) for r in rows(getattr(best, ph), (ph,))]
    print(f"# {title}")
    print(tabulate(found, headers=HEADERS, disable_numparse=True) if found else "  no layout meets the targets")
    if best.decode:
        print(f"# decode memory: {_describe_memory(best.decode)}")


def cmd_serve(args) -> int:
    system = system_from(args)
    _check(args, system)
    start = time.perf_counter()
    targets = ", ".join(f"{n} <= {v:g} ms" for n, v in (("TPOT", args.tpot_ms), ("TTFT", args.ttft_ms)) if v) or "none"
    decode = "eager" if args.eager_decode else f"as a captured graph ({GRAPH_LAUNCH_US:g} us a kernel)"
    head = (f"# relay serve: {args.workload} on {system.describe()}, input {args.input_len} + output "
            f"{args.output_len} tokens per request, {args.precision}, {args.routing} routing; decode {decode}, "
            "prefill eager; analytic model, every figure emulated"
            + (f"; decode with one MTP draft a step, accepted {args.mtp:g} of the time: TPOT = step / "
               f"{1 + args.mtp:g}" if args.mtp is not None else ""))
    if args.breakeven:
        fast = System.preset(args.breakeven) if args.breakeven in System.presets() else None
        if fast is None:
            raise ConfigError(f"--breakeven = {args.breakeven!r} is not a system preset; choose one of "
                              f"{', '.join(System.presets())}")
        fast_precision = args.fast_precision or args.precision
        if args.fast_precision is None and getattr(fast.chip, DTYPE_PEAK[fast_precision]) is None:
            raise ConfigError(f"--breakeven {args.breakeven} with --precision {args.precision}: the fast side's "
                              f"{fast.chip.name} has no {args.precision} peak and takes --precision unless told; "
                              "give --fast-precision bf16 (or fp8)")
        fast.chip.peak_flops(fast_precision)
        print(head + f"; break-even against {fast.describe()} ({fast_precision}), latency targets {targets}")
        b = serving_search.breakeven(args.workload, system, fast, args.input_len, args.output_len, args.precision,
                                     args.tpot_ms, args.ttft_ms, fast_precision, args.routing, not args.eager_decode)
        _print_best(f"slow side: {system.name} x {system.devices} ({args.precision})", b.slow)
        _print_best(f"fast side: {fast.name} x {fast.devices} ({fast_precision})", b.fast)
        for phase, n in (("decode (output tokens/s)", b.decode_devices),
                         ("prefill (prompt tokens/s)", b.prefill_devices)):
            print(f"# break-even, {phase}: {n if n is not None else 'n/a'} {system.chip.name} devices match "
                  f"{fast.devices} {fast.chip.name} devices at the same targets ({targets})")
        print(f"# took {time.perf_counter() - start:.1f} real s")
        return 0
    if args.search:
        print(head + f"; layouts searched under {targets}")
        best = serving_search.search(args.workload, system, args.input_len, args.output_len, args.precision,
                                     args.tpot_ms, args.ttft_ms, routing=args.routing, graphs=not args.eager_decode,
                                     mtp=args.mtp)
        table = []
        for layout, dec, pre in best.tried:
            for ph, one in (("prefill", pre), ("decode", dec)):
                table += rows(one, (ph,)) if one else [[ph, str(layout), "-", "", "misses", "", "", "", "", ""]]
        print(tabulate(table, headers=HEADERS, disable_numparse=True))
        _print_best("best per phase (disaggregated pools: each phase its own layout)", best)
        print(f"# {len(best.tried)} layouts searched in {time.perf_counter() - start:.1f} real s")
        return 0
    c = config_of(args.workload, 1)
    moe_ep = system.devices if hasattr(c, "n_experts") else 1  # experts over every device, unless told
    layout = Layout.parse(args.parallel, system.devices) if args.parallel else Layout(system.devices, 1, moe_ep)
    if args.parallel and "ep=" not in args.parallel:
        layout = Layout(layout.dp, layout.tp, moe_ep)
    if args.shared and layout.tp != 1:
        raise ConfigError(f"--shared with --parallel {layout}: runs on the devices take tp=1; give tp=1")
    s = mtp.serve(args.workload, system, layout, args.batch or BATCH, args.input_len, args.output_len, args.precision,
                  args.mtp, overlap=False if args.no_overlap else None, prefill_batch=args.prefill_batch,
                  routing=args.routing, graphs=not args.eager_decode)
    if args.shared and not s.fits:  # the devices would run out of HBM: refused before any of them starts
        m = s.memory
        ep = ", a larger ep (--parallel dp=..,ep=N)" if hasattr(c, "n_experts") else ""
        fewer = "" if m["weights"] >= m["hbm"] else (f"fewer sequences per replica (--batch, now {s.batch}; "
                                                     f"--prefill-batch, now {s.prefill_batch}), ")
        raise ConfigError(f"--shared with layout {s.layout} of {args.workload}: needs {m['total'] / GB:.1f} GB per "
                          f"device (weights {m['weights'] / GB:.1f} + KV cache {m['kv_cache'] / GB:.1f} + activations "
                          f"{m['activations'] / GB:.1f} GB) but {system.chip.name} has {m['hbm'] / GB:.0f} GB of HBM; "
                          f"give {fewer}more devices (--devices, now {system.devices}){ep}, or drop --shared "
                          "for the analytic figures alone")
    print(head)
    print(tabulate(rows(s), headers=HEADERS, disable_numparse=True))
    print(f"# memory per device: {_describe_memory(s)}")
    step = "one decode step" if s.mtp is None else \
        f"one decode step (2 tokens a sequence, then the MTP module) / {1 + s.mtp:g} tokens a step"
    print(f"# TTFT: one prefill step of {s.prefill_batch} prompts; TPOT: {step} at context "
          f"{args.input_len + args.output_len // 2} (the decode's mean); took {time.perf_counter() - start:.1f} real s")
    if args.shared:
        _shared(args, system, s)
    return 0 if s.fits else 1


def _shared(args, system, s) -> None:
    """The layout's steps run on the emulated devices (shared), beside the analytic ones."""
    from relay.device.training.serving import Step
    from relay.driver import serving as on_devices
    from relay.driver.cluster import Cluster
    phases = ("decode", "prefill") if args.shared == "both" else (args.shared,)
    table = []
    with Cluster(system, clock="virtual", tensors="fake", timeout_s=1800) as cluster:
        for ph in phases:
            t0 = time.perf_counter()
            batch, tokens, context = (s.batch, 1, args.input_len + args.output_len // 2) if ph == "decode" else \
                (s.prefill_batch, args.input_len, args.input_len)
            model, drafts = getattr(s, ph), 0
            if ph == "decode" and s.mtp is not None:  # the devices run the verify step: the token and its draft
                tokens, drafts, whole = 2, 1, model.seconds
                model = serving.phase(args.workload, s.layout, system, args.precision, batch, 2, context,
                                      model.micro == 2, routing=args.routing, graphs=model.graphs)
                module_ms = (whole - model.seconds) * 1e3
            step = Step(args.workload, s.layout.dp, s.layout.ep, batch, tokens, context, model.micro, model.graphs,
                        drafts)
            res = on_devices.run(cluster, step, shared_run=True)
            table.append([ph, str(s.layout), batch, str(model.micro), f"{res.seconds * 1e3:.2f}",
                          f"{model.seconds * 1e3:.2f}", f"{model.seconds / res.seconds:.3f}",
                          f"{res.compute_s * 1e3:.2f}", f"{res.comm_s * 1e3:.2f}", f"{res.exposed_s * 1e3:.2f}",
                          f"{res.roles} / {system.devices}", f"{time.perf_counter() - t0:.0f}"])
    print(f"# the same steps on the {system.devices} emulated devices (fake tensors, full size; shared run: "
          "recorded roles replayed on every device; every figure emulated but the last column)"
          + ("; decode: the verify step (2 tokens a sequence), the MTP module after it "
             f"({module_ms:.2f} ms) analytic only" if s.mtp is not None and "decode" in phases
             else ""))
    print(tabulate(table, headers=["phase", "layout", "batch", "micro-\nbatches", "devices\n(emulated ms)",
                                   "analytic\n(emulated ms)", "analytic /\ndevices", "compute\n(emulated ms)",
                                   "dispatch+combine\n(emulated ms)", "exposed\n(emulated ms)",
                                   "roles /\ndevices", "took\n(host s)"], disable_numparse=True))
