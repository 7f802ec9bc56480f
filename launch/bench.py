"""`relay bench`: an nccl-tests-style collective benchmark on emulated devices."""

from __future__ import annotations

import json

from tabulate import tabulate

from relay import Cluster
from relay.collectives import ALGORITHMS, DTYPE_BYTES, busbw_factor, simulate
from relay.collectives.schedules import algorithms_for, check
from relay.launch.options import UsageError, fmt_bytes, parse_bytes, system_from, vars_of
from relay.results.folder import ResultsDir, environment, system_dict
from relay.results.write import write_bench


def cmd_bench(args) -> None:
    args.clock = args.clock or "virtual"
    system = system_from(args)
    algorithms = [a for a in ALGORITHMS if a in algorithms_for(args.primitive)] if args.algorithm == "all" \
        else args.algorithm.split(",")
    for a in algorithms:
        check(args.primitive, a, allow_auto=True)
    if args.dtype not in DTYPE_BYTES:
        raise UsageError(f"--dtype = {args.dtype!r} is unknown; choose one of {', '.join(DTYPE_BYTES)}")
    lo, hi = parse_bytes(args.min_bytes), parse_bytes(args.max_bytes)
    if not 0 < lo <= hi:
        raise UsageError(f"--min-bytes {args.min_bytes} / --max-bytes {args.max_bytes}: need 0 < min <= max")
    if args.factor < 2:
        raise UsageError(f"--factor = {args.factor} is invalid; give an integer >= 2")
    elem, world = DTYPE_BYTES[args.dtype], system.devices
    unit = elem * (world if args.primitive in ("all_gather", "reduce_scatter", "all_to_all") else 1)
    sizes, n = [], lo
    while n <= hi:
        sizes.append(max(unit, n // unit * unit))
        n *= args.factor
    rows = []
    if args.executor == "local":
        for a in algorithms:
            for size in sizes:
                t = simulate(args.primitive, a, size, system, dtype=args.dtype)
                rows.append((size, a, t, None))
    else:
        with Cluster(system, clock=args.clock, dilation=args.dilation, address=args.address) as cluster:
            for a in algorithms:
                per = world if args.primitive == "all_gather" else 1
                cases = [(size // elem // per, args.dtype) for size in sizes]
                for size, res in zip(sizes, cluster.collectives(args.primitive, cases, a, repeats=args.repeats)):
                    rows.append((size, a, res.emulated_s, res.real_s))
    out_rows = []
    for size, a, t, real in rows:
        algbw = size / t / 1e9 if t > 0 else float("inf")
        out_rows.append({"size_bytes": size, "count": size // elem, "dtype": args.dtype,
                         "primitive": args.primitive, "algorithm": a, "time_us": t * 1e6, "algbw_GBps": algbw,
                         "busbw_GBps": algbw * busbw_factor(args.primitive, world), "real_s": real})
    if args.json:
        print(json.dumps({"system": system.describe(), "clock": args.clock, "executor": args.executor,
                          "rows": out_rows}, indent=2))
        return
    print(f"# relay bench: {args.primitive} on {system.describe()}")
    print(f"# emulated figures ({args.clock} clock, {args.executor} executor); real_s is host wall time")
    print(tabulate([[fmt_bytes(r["size_bytes"]), r["count"], r["dtype"], r["algorithm"], f"{r['time_us']:.2f}",
                     f"{r['algbw_GBps']:.2f}", f"{r['busbw_GBps']:.2f}",
                     "-" if r["real_s"] is None else f"{r['real_s']:.4f}"] for r in out_rows],
                   headers=["size", "count", "type", "algorithm", "emul time (us)", "emul algbw (GB/s)",
                            "emul busbw (GB/s)", "real (s)"], disable_numparse=True))
    if args.name:
        out = ResultsDir(args.out or "results", args.name)
        write_bench(out, {"command": "bench", "options": vars_of(args),
                          "system": system_dict(system), **environment()}, out_rows, system, args.primitive)
        print(f"# results: {out.path} (busbw.png)")


