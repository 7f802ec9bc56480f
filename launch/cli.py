"""`relay`: the command line.

Every emulated figure is labelled as emulated and every host figure as real, with units in the
column names. Bad input (a relay.errors.ConfigError) exits with status 2 and a one-line
message; any other error is a bug or a failure of the environment and shows its traceback."""

from __future__ import annotations

import argparse
import json
import sys

from tabulate import tabulate

from relay import DeviceError, chips
from relay.errors import ConfigError
from relay.launch import plan, presets, ray_cluster, script, serve, validate
from relay.launch.bench import cmd_bench
from relay.launch.breakeven import cmd_breakeven
from relay.launch.options import add_preset_arg, add_run_args, add_system_args, add_train_args
from relay.launch.report import cmd_report
from relay.launch.run import cmd_run
from relay.launch.sweep import cmd_sweep
from relay.results.folder import ResultsDir


def cmd_chips(args) -> None:
    rows = [chips.get(n) for n in chips.names()]
    if args.json:
        print(json.dumps([c.as_dict() for c in rows], indent=2))
        return

    def v(c, f):
        x = getattr(c, f)
        return ("-" if chips.MAYBE.get(f) == "none" or f in chips.OPTIONAL else "unknown") if x is None else \
            f"{x:g}" + (" (est.)" if c.is_estimate(f) else "")

    table = [[c.name, c.display, v(c, "bf16_tflops"), v(c, "fp8_tflops"), v(c, "int8_tops"), v(c, "hbm_gb"),
              v(c, "hbm_tbps"),
              v(c, "scaleup_gbps"), v(c, "scaleup_latency_us"), v(c, "scaleout_gbps"), v(c, "power_w")]
             for c in rows]
    print(tabulate(table, headers=["chip", "name", "BF16 TFLOPS", "FP8 TFLOPS", "INT8 TOPS", "HBM GB", "HBM TB/s",
                                   "scale-up GB/s", "scale-up us", "scale-out GB/s", "power W"]))
    print("\nGB/s are per device and direction; (est.) marks estimates or disputed figures.\nSources:")
    for c in rows:
        by_source = {}
        for f, src in c.sources.items():
            by_source.setdefault(src, []).append(f)
        print(f"  {c.name}:")
        for src, fs in by_source.items():
            print(f"    {', '.join(fs)}: {src}")
        if c.note:
            print(f"    note: {c.note}")


# ---------------------------------------------------------------- relay bench
# ---------------------------------------------------------------- relay demo
def cmd_demo(args) -> None:
    """`relay breakeven --preset demo-fullscale` (the analytic plan search at full size, about a
    minute), then `relay breakeven --preset demo` (real training runs of the toy model)."""
    parser = build_parser()
    for preset in ("demo-fullscale", "demo"):
        demo = parser.parse_args(["breakeven", "--preset", preset])
        with_preset(parser, demo)
        demo.fn(demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay", description="Emulate many accelerators with real processes.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("chips", help="the chip catalog, with sources")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_chips)

    b = sub.add_parser("bench", help="nccl-tests-style collective benchmark on emulated devices")
    add_system_args(b)
    add_run_args(b)
    b.add_argument("--primitive", default="all_reduce", help="all_reduce, reduce_scatter, all_gather, broadcast, "
                   "all_to_all")
    b.add_argument("--algorithm", default="auto", help="auto (the vendor library's choice, default), ring, "
                   "tree, halving_doubling, direct, hierarchical, hier_pipelined, nvls, sharp (with --sharp), "
                   "a comma-separated list, or all")
    b.add_argument("--min-bytes", default="8", help="smallest buffer (e.g. 8, 1K)")
    b.add_argument("--max-bytes", default="64M", help="largest buffer (e.g. 64M)")
    b.add_argument("--factor", type=int, default=4, help="size step factor")
    b.add_argument("--dtype", default="float32")
    b.add_argument("--repeats", type=int, default=1)
    b.add_argument("--executor", choices=("actors", "local"), default="actors",
                   help="actors: real processes over gloo; local: the one-process executor (any size)")
    b.add_argument("--json", action="store_true")
    b.add_argument("--name", help="also write results/<name>/ (busbw.png, summary.json, ...)")
    b.add_argument("--out", help="results root (default: results)")
    b.set_defaults(fn=cmd_bench)

    r = sub.add_parser("run", help="one training run: summary table and a results folder")
    add_preset_arg(r)
    add_system_args(r)
    add_train_args(r)
    add_run_args(r)
    r.add_argument("--precision", choices=("bf16", "fp8"), help="emulated compute precision (default bf16); fp8: "
                   "torchao float8 training (Linear GEMMs in FP8, casts charged), on chips with an FP8 peak")
    r.add_argument("--algorithm", help="all-reduce algorithm for the gradients (default auto: the "
                   "vendor library's choice by size and system)")
    r.add_argument("--trace", action="store_true", default=None,
                   help="also write trace.json: a per-device timeline in emulated time (open in Perfetto)")
    r.set_defaults(fn=cmd_run)

    sw = sub.add_parser("sweep", help="one workload over device counts x chips (or systems) x algorithms")
    add_preset_arg(sw)
    g = sw.add_argument_group("what to sweep")
    g.add_argument("--devices", help="device counts, e.g. 1,2,4,8")
    g.add_argument("--chips", help="chips, e.g. h100,ascend-910c (one scale-up domain each)")
    g.add_argument("--systems", help="system presets, scaled to each device count")
    g.add_argument("--domain", type=int, help="with --chips: devices per scale-up domain")
    g.add_argument("--algorithms", help="all-reduce algorithms, e.g. ring,tree (default auto)")
    g.add_argument("--scaling", help="weak: fixed --per-device-batch (default); strong: fixed --global-batch")
    add_train_args(sw)
    add_run_args(sw)
    sw.set_defaults(fn=cmd_sweep)

    be = sub.add_parser("breakeven", help="how many slow devices match the fast system")
    add_preset_arg(be)
    g = be.add_argument_group("what to compare")
    g.add_argument("--fast", help="the fast side: a system preset (e.g. nvl72) or a chip with --fast-devices")
    g.add_argument("--fast-devices", type=int, help="scale the fast system to this many devices")
    g.add_argument("--slow", help="the slow side: a chip (one domain, its own links) or a system preset")
    g.add_argument("--algorithms", help="all-reduce algorithms to compare, e.g. ring,halving_doubling "
                   "(default auto)")
    g.add_argument("--metric", help="throughput (default) or time-to-loss")
    g.add_argument("--target-loss", type=float, help="with --metric time-to-loss: the loss to reach")
    g.add_argument("--max-devices", type=int, help="largest slow device count to search")
    g.add_argument("--curve", help="also run the slow side at these device counts (for the plot), e.g. 1,8,16,32")
    g.add_argument("--sensitivity", action="store_true", default=None,
                   help="also re-run the search with each uncertain model parameter at the ends of its "
                        "range (launch, matmul and memory efficiency, link efficiency) for summary.md")
    g.add_argument("--uncertainty", type=int, metavar="N", help="full scale: also sample the break-even N times "
                   "over the uncertain inputs' ranges (efficiencies, links, routing skew, failure rates) for the "
                   "median and 10th-90th percentile and a tornado plot (e.g. 2000; default off)")
    g.add_argument("--plan-search", action="store_true", default=None,
                   help="full scale: each side's best plan from the analytic plan search (the default when "
                        "--workload names full-size language models, e.g. llama3-70b,deepseek-v3)")
    g.add_argument("--racks", help="full scale: fast systems of this many presets each, e.g. 1,2,4 (default 1)")
    g.add_argument("--train-tokens", type=float, help="full scale: tokens to train for the time-to-train "
                   "column (default 1e12)")
    g.add_argument("--batch-tolerance", type=float, help="full scale: each plan's global batch is the multiple of "
                   "its dp nearest --global-batch, within this fraction of it (default 0.125)")
    g.add_argument("--precisions", help="full scale: bf16 (both sides), best (each side at its best precision: "
                   "FP8 where the chip has it), or both, e.g. bf16,best (default)")
    add_train_args(be)
    add_run_args(be)
    be.set_defaults(fn=cmd_breakeven)

    plan.add_parser(sub)
    serve.add_parser(sub)
    ray_cluster.add_parser(sub)
    validate.add_parser(sub)
    script.add_parser(sub)

    rp = sub.add_parser("report", help="redraw the plots of a results folder and print its summary")
    rp.add_argument("path", help="results/<name>")
    rp.set_defaults(fn=cmd_report)

    d = sub.add_parser("demo", help="the headline question, small: one NVL72 against 910C on llama3-70b "
                      "(analytic, about a minute), then the toy model on real runs (about 6 minutes on 2 cores)")
    d.set_defaults(fn=cmd_demo)
    return p


def with_preset(parser: argparse.ArgumentParser, args) -> None:
    """Fill unset options from --preset (a command's own options only)."""
    if getattr(args, "preset", None):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        valid = {a.dest for a in sub.choices[args.command]._actions} - {"help", "preset"}
        presets.apply(args, args.command, valid)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with_preset(parser, args)
        return args.fn(args) or 0
    except DeviceError as e:  # a device failed mid-run: not bad input, but no traceback either
        print(f"relay {args.command}: run failed: {e}", file=sys.stderr)
        for line in e.last_lines():  # a script's traceback's end, or its message (argparse's)
            print(f"  {line}", file=sys.stderr)
        for note in getattr(e, "__notes__", ()):
            print(f"relay {args.command}: {note}", file=sys.stderr)
        return 1
    except ConfigError as e:  # bad input: the message says what to change; other errors show a traceback
        print(f"relay {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"relay {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        ResultsDir.release_all()


if __name__ == "__main__":
    sys.exit(main())
