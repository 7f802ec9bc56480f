"""The serving layouts of a model on a system under latency targets (`search`), and the serving
break-even of a slow system against a fast one at equal targets (`breakeven`).

Prefill and decode run on separate pools of devices (prefill-decode disaggregation, as DeepSeek's
inference system, SGLang's large-scale EP and CloudMatrix-Infer run them), so each phase's best
layout is chosen on its own: decode, the largest batch per replica whose TPOT meets `tpot_ms` and
whose weights + KV cache + activations fit the HBM, then the layout with the most output tokens/s
per device; prefill, the largest prompt batch whose TTFT meets `ttft_ms`, then the most prompt
tokens/s per device. TPOT and TTFT grow with the batch, so each batch is found by bisection over
powers of two and the integers between them. Layouts tried: tp over the divisors of the scale-up
domain (at most MAX_TP) that split the heads; for MoE models, ep over the whole system and over one domain.
With `mtp` (an acceptance rate) decode runs one multi-token prediction draft a step (mtp.py); the
break-even runs none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from relay.analytic.mtp import serve
from relay.analytic.serving import Layout, Serving, config_of
from relay.errors import ConfigError

MAX_BATCH = 1024  # sequences per replica in a decode step, at most
MAX_PREFILL_BATCH = 64  # prompts per replica in a prefill step, at most
MAX_TP = 8  # tensor parallel at most: one node's 8 GPUs, the most any serving deployment cited here uses


@dataclass(frozen=True)
class Best:
    decode: Serving | None  # the layout and batch with the most output tokens/s per device
    prefill: Serving | None  # the layout and prompt batch with the most prompt tokens/s per device
    tried: list  # every (layout, decode Serving or None, prefill Serving or None)


def layouts(workload: str, system) -> list[Layout]:
    c = config_of(workload, 1)
    heads = [c.n_heads] + ([c.n_kv_heads] if getattr(c, "attention", "gqa") == "gqa" else [])
    n = system.devices
    tps = [t for t in range(1, min(system.domain, n, MAX_TP) + 1) if n % t == 0 and not any(h % t for h in heads)]
    eps = sorted({n, system.domain if n % system.domain == 0 else n}) if hasattr(c, "n_experts") else [1]
    return [Layout(n // t, t, e) for t in tps for e in eps]


def _largest(ok, hi: int) -> int:
    """The largest b in [1, hi] with ok(b), ok being monotone (true then false); 0 if none."""
    if not ok(1):
        return 0
    lo = 1
    while lo * 2 <= hi and ok(lo * 2):
        lo *= 2
    top = min(lo * 2, hi + 1)  # ok(lo), not ok(top) (or past hi)
    while top - lo > 1:
        mid = (lo + top) // 2
        lo, top = (mid, top) if ok(mid) else (lo, mid)
    return lo


def search(workload: str, system, input_len: int, output_len: int, dtype: str = "bf16",
           tpot_ms: float | None = None, ttft_ms: float | None = None, max_batch: int = MAX_BATCH,
           phases: tuple = ("prefill", "decode"), routing: str = "balanced", graphs: bool = True,
           mtp: float | None = None) -> Best:
    for name, v in (("--tpot-ms", tpot_ms), ("--ttft-ms", ttft_ms)):
        if v is not None and not v > 0:
            raise ConfigError(f"{name} = {v} is invalid; give a latency target in ms > 0")
    tried = []
    for layout in layouts(workload, system):
        def run(batch: int, prefill_batch: int = 1) -> Serving:
            return serve(workload, system, layout, batch, input_len, output_len, dtype, mtp,
                         prefill_batch=prefill_batch, routing=routing, graphs=graphs)

        def decode_ok(b: int) -> bool:
            s = run(b)
            return s.fits and (tpot_ms is None or s.tpot_s * 1e3 <= tpot_ms)

        def prefill_ok(b: int) -> bool:
            s = run(1, b)
            return s.fits and (ttft_ms is None or s.ttft_s * 1e3 <= ttft_ms)

        b = _largest(decode_ok, max_batch) if "decode" in phases else 0
        p = _largest(prefill_ok, MAX_PREFILL_BATCH) if "prefill" in phases else 0
        tried.append((layout, run(b) if b else None, run(1, p) if p else None))
    decodes = [d for _, d, _ in tried if d]
    prefills = [p for _, _, p in tried if p]
    return Best(max(decodes, key=lambda s: s.decode_tps, default=None),
                max(prefills, key=lambda s: s.prefill_tps, default=None), tried)


@dataclass(frozen=True)
class Breakeven:
    slow: Best
    fast: Best
    decode_devices: int | None  # slow devices whose output tokens/s match the whole fast system's
    prefill_devices: int | None  # the same for prompt tokens/s


def breakeven(workload: str, slow, fast, input_len: int, output_len: int, dtype: str = "bf16",
              tpot_ms: float | None = None, ttft_ms: float | None = None, fast_dtype: str | None = None,
              routing: str = "balanced", graphs: bool = True) -> Breakeven:
    """Slow devices (at the slow system's per-device throughput, at its own size) that match the
    fast system's total throughput, decode and prefill, at the same latency targets."""
    s = search(workload, slow, input_len, output_len, dtype, tpot_ms, ttft_ms, routing=routing, graphs=graphs)
    f = search(workload, fast, input_len, output_len, fast_dtype or dtype, tpot_ms, ttft_ms, routing=routing,
               graphs=graphs)

    def count(a: Serving | None, b: Serving | None, rate: str) -> int | None:
        if a is None or b is None:
            return None
        return math.ceil(fast.devices * getattr(b, rate) / getattr(a, rate))

    return Breakeven(s, f, count(s.decode, f.decode, "decode_tps"), count(s.prefill, f.prefill, "prefill_tps"))
