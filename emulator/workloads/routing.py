"""Routing models: how many tokens each expert of a mixture-of-experts layer receives when the
tensors are fake and carry no data to route by.

A routing model gives, for one MoE layer, the token count of every expert (`counts`). Real
routing (real tensors) counts real top-k choices instead; a `Histogram` of those counts,
recorded from a real run, makes a fake run route exactly as that run did.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Zipf:
    """Expert i (from 0) gets a share proportional to 1 / (i + 1)^s: s = 0 is balanced routing,
    larger s piles the tokens onto the first experts (capped: a token picks k distinct experts, so
    no expert gets more than one choice per token)."""

    s: float = 0.0  # Zipf exponent, >= 0

    def __post_init__(self):
        if not isinstance(self.s, (int, float)) or isinstance(self.s, bool) or not self.s >= 0:
            raise ValueError(f"s = {self.s!r} is invalid; give a Zipf exponent >= 0 (0: balanced)")

    def counts(self, layer: int, choices: int, experts: int, top_k: int) -> list[int]:
        return apportion(choices, [(i + 1) ** -self.s for i in range(experts)], choices // top_k)


def balanced() -> Zipf:
    return Zipf(0.0)


@dataclass(frozen=True)
class Histogram:
    """Token counts (or any weights) per expert, one list per MoE layer in model order (a real
    run's `counts`), or a single list for every layer; scaled to the number of choices."""

    per_layer: tuple  # tuple of tuples of weights >= 0, one per expert

    def __post_init__(self):
        rows = self.per_layer
        if rows and not isinstance(rows[0], (list, tuple)):
            rows = (rows,)
        rows = tuple(tuple(r) for r in rows)
        if not rows or any(not r or min(r) < 0 or sum(r) <= 0 for r in rows):
            raise ValueError(f"per_layer = {self.per_layer!r} is invalid; give one list of expert "
                             "weights >= 0 (not all 0) per MoE layer, or one list for every layer")
        object.__setattr__(self, "per_layer", rows)

    def counts(self, layer: int, choices: int, experts: int, top_k: int) -> list[int]:
        row = self.per_layer[layer % len(self.per_layer)]
        if len(row) != experts:
            raise ValueError(f"histogram of layer {layer} has {len(row)} experts; the model has {experts}")
        return apportion(choices, list(row), choices // top_k)


def apportion(total: int, weights: list[float], cap: int) -> list[int]:
    """Integers summing to total, proportional to weights, none above cap: water-filling for the
    cap, then the largest remainders get the units that rounding down left over."""
    n = len(weights)
    if total > cap * n:
        raise ValueError(f"{total} choices cannot be spread over {n} experts of at most {cap} each")
    shares, free, left = [0.0] * n, set(range(n)), float(total)
    while free:
        w = sum(weights[i] for i in free)
        if w <= 0:  # only experts of weight 0 are left: spread the rest evenly over them
            weights = [1.0 if i in free else x for i, x in enumerate(weights)]
            continue
        over = [i for i in free if left * weights[i] / w > cap]
        if not over:
            break
        for i in over:
            shares[i], left = cap, left - cap
            free.remove(i)
    if free:
        w = sum(weights[i] for i in free)
        for i in free:
            shares[i] = left * weights[i] / w
    counts = [math.floor(s + 1e-9) for s in shares]
    by_remainder = sorted((i for i in range(n) if counts[i] < cap), key=lambda i: counts[i] - shares[i])
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def parse(spec):
    """A routing model from its name: 'balanced', 'zipf:S' (S the exponent), or the path of a JSON
    file holding a Histogram's counts (one list per MoE layer, or one list for all); a routing
    model passes through, None stays None (balanced, where one is needed)."""
    if spec is None or isinstance(spec, (Zipf, Histogram)):
        return spec
    text = str(spec).strip()
    if text == "balanced":
        return balanced()
    if text.startswith("zipf:"):
        try:
            return Zipf(float(text[5:]))
        except ValueError:
            raise ValueError(f"routing = {spec!r}: the Zipf exponent is not a number; write e.g. zipf:1.2") from None
    try:
        with open(text) as fh:
            return Histogram(json.load(fh))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"routing = {spec!r} is neither 'balanced', 'zipf:S' nor a readable JSON file of counts "
                         f"per expert ({e}); give one of those") from None
