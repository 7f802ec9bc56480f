"""`relay validate --inference`: the serving model (emulator/analytic/serving.py) against published
serving throughput of DeepSeek-V3/R1 (emulator/hardware/serving.toml: CloudMatrix-Infer on
CloudMatrix384, SGLang's large-scale EP on H100 and GB200), each row at the layout its source
states, with multi-token prediction where its source states it (`mtp_acceptance`, the source's
acceptance rate of the one draft token, cited in `mtp_source`: analytic/mtp.py). A decode row
with a latency bound runs the largest batch meeting it (the source's figure
is the best under the bound); one with a batch runs that batch; a prefill row runs its prompt
tokens per step. The verdict: median |error| <= 15% over the rows run and not used for fitting
(none is); with no such row there is nothing to judge, a miss."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tabulate import tabulate

from relay import System, chips
from relay.analytic import mtp, serving
from relay.analytic.serving_search import MAX_BATCH, _largest
from relay.errors import ConfigError
from relay.launch.validate import update
from relay.launch.validate_training import summary, verdict

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

SERVING = chips.CATALOG.with_name("serving.toml")
WORKLOAD = "deepseek-v3"  # DeepSeek-R1 has DeepSeek-V3's architecture
TARGET_MEDIAN = 0.15


@dataclass(frozen=True)
class Row:
    id: str
    phase: str  # "prefill" or "decode"
    system: str  # in words
    chip: str
    devices: int
    domain: int
    dp: int
    tp: int
    ep: int
    input_len: int
    output_len: int
    precision: str
    published_precision: str
    published: float
    unit: str
    source: str
    batch: int | None = None
    tpot_ms: float | None = None
    prefill_tokens: int | None = None
    assumed: list = field(default_factory=list)
    note: str = ""
    fit: bool = False
    relay: float = 0.0
    mtp_acceptance: float | None = None  # one MTP draft a decode step, accepted this often (where the source states it)
    mtp_source: str = ""  # where the source states its MTP and acceptance rate


def load(path=SERVING) -> list[Row]:
    with open(path, "rb") as fh:
        return [Row(**r) for r in tomllib.load(fh)["row"]]


def figure(row: Row) -> tuple[float, str]:
    """Relay's tokens/s per device for the row, and what it ran."""
    system = System(row.chip, row.devices, domain=min(row.domain, row.devices))
    layout = serving.Layout(row.dp, row.tp, row.ep)

    def run(batch: int, prefill_batch: int = 1):
        return mtp.serve(WORKLOAD, system, layout, batch, row.input_len, row.output_len, row.precision,
                         row.mtp_acceptance, prefill_batch=prefill_batch)

    if row.phase == "prefill":
        s = run(1, max(1, row.prefill_tokens // row.input_len))
        return s.prefill_tps, f"{layout}, {s.prefill_batch} prompts/step, TTFT {s.ttft_s * 1e3:.0f} ms"
    batch = row.batch or _largest(lambda b: run(b).fits and run(b).tpot_s * 1e3 <= row.tpot_ms, MAX_BATCH)
    if not batch:
        return 0.0, f"{layout}: no batch meets TPOT <= {row.tpot_ms} ms"
    s = run(batch)
    spec = f", MTP {row.mtp_acceptance:g} accepted" if row.mtp_acceptance is not None else ""
    return s.decode_tps, f"{layout}, batch {batch}{spec}, TPOT {s.tpot_s * 1e3:.1f} ms"


def evaluate(rows: list[Row]) -> list[dict]:
    out = []
    for r in rows:
        fig, ran = figure(r)
        out.append({"row": r, "relay": fig, "ran": ran, "ratio": fig / r.published, "err": abs(fig / r.published - 1)})
    return out


def cmd_inference(args) -> int:
    rows = load(args.table or SERVING)
    if args.only:
        import re
        rows = [r for r in rows if re.search(args.only, r.id)]
        if not rows:  # as --training's: no row is refused, not judged
            raise ConfigError(f"--only = {args.only!r} matches no row id of {args.table or SERVING}; give a regular "
                              "expression matching some (e.g. sglang)")
    results = evaluate(rows)
    s = summary(results, bound=None)  # (issue 29's target bounds the median only)
    median = s["median_abs_err"]
    ok, line = verdict(s, TARGET_MEDIAN)
    if args.update:
        update(args.table or SERVING, results)
    if args.json:
        print(json.dumps({"rows": [{"id": x["row"].id, "published": x["row"].published, "relay": x["relay"],
                                    "unit": x["row"].unit, "ran": x["ran"], "source": x["row"].source}
                                   for x in results], "median_abs_err": median, "verdict": line}, indent=2))
        return 0 if ok else 1
    print("# relay validate --inference: the serving model (emulated) against published DeepSeek-V3/R1 serving "
          "throughput (marked inference)")
    table = [[x["row"].id, x["row"].phase, x["ran"], f"{x['row'].published_precision} / {x['row'].precision}",
              f"{x['row'].published:,.0f}", f"{x['relay']:,.0f}", x["row"].unit, f"{x['ratio']:.3f}",
              f"{x['err']:.1%}", ", ".join(x["row"].assumed)] for x in results]
    print(tabulate(table, headers=["row (inference)", "phase", "relay ran", "precision\n(source / relay)",
                                   "published", "relay\n(emulated)", "unit", "ratio", "|error|", "assumed"],
                   disable_numparse=True))
    for x in results:
        if x["row"].note:
            print(f"#   {x['row'].id}: {x['row'].note}")
    print(line)
    return 0 if ok else 1
