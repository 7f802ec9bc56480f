"""The expert dispatch and combine of large-scale EP serving, costed by the peers a dispatch
reaches: a rank sends a message only to the ranks owning an expert its tokens chose, and each
(token, expert) row once (a token copy per chosen expert). DeepEP's low-latency kernels (the ones
decoding runs) write each token copy straight into the receiving rank's buffer and skip ranks
that get none; SGLang and vLLM dispatch through DeepEP; the relay backend's all-to-all leaves
empty messages out (collectives/alltoall.py). So at small batches a rank pays the per-message
cost (alpha) for the few ranks it reaches, not for all P - 1 peers.

Routing (how a rank's `rows` = tokens x top_k rows fall on the P ranks of the ep group):
    balanced  rows spread evenly, the remainder rotated (workloads.inference.balanced_splits, as
              the device step runs it): the rank itself and the next min(rows, P) - 1 peers are
              reached, exactly; at rows >= P every peer
    uniform   each row to a rank drawn uniformly: (P - 1)(1 - (1 - 1/P)^rows) peers reached in
              expectation (the expected number of distinct ranks among `rows` draws, the rank
              itself left out), fewer than balanced at rows >= P
The time is the collectives' closed form (collectives/closed.py: the port serves one message at
a time, a + m (o + w(s)) for m messages of s bytes) with m the peers reached instead of P - 1, and
the algorithm and protocol chosen as the devices choose them (by the even all-to-all of the
mean size). Where every peer is reached it is the dense closed form, to the bit. Across domains
(direct: both link classes side by side; hierarchical: one scale-up step, then one scale-out step)
the messages of each level are those of the dense schedule times the share of them reached: for
uniform routing the expected count; for balanced routing an estimate (the rotation keeps rows
near their rank, so the executor sends fewer scale-out messages: within 25% below 8 rows per rank
on 9 domains of 8 H100, exact once every peer is reached). In one domain it is exact.
"""

from __future__ import annotations

from relay.collectives import predict, resolve
from relay.errors import ConfigError

ROUTINGS = ("balanced", "uniform")


def _reached(rows: float, slots: int, routing: str) -> float:
    """The share of `slots` receivers that get at least one of `rows` rows (1 when all do)."""
    if routing == "balanced":
        return min(1.0, rows / slots)
    return 1.0 - (1.0 - 1.0 / slots) ** rows


def peers(rows: int, world: int, routing: str = "balanced") -> float:
    """Peers (other ranks) a rank sends a message to, `rows` (token, expert) rows over `world` ranks."""
    if routing not in ROUTINGS:
        raise ConfigError(f"routing = {routing!r} is not a serving routing; choose one of {', '.join(ROUTINGS)}")
    if world <= 1 or rows <= 0:
        return 0.0
    if routing == "balanced":
        return float(min(rows, world) - 1)
    return (world - 1) * _reached(rows, world, routing)


def seconds(rows: int, row_bytes: float, group, routing: str = "balanced") -> float:
    """Emulated seconds of one all-to-all of `rows` rows of `row_bytes` per rank over `group` (the ep
    group's system), each rank sending only to the peers its rows reach."""
    p = group.devices
    if p <= 1 or rows <= 0:
        return 0.0
    n = rows * row_bytes  # each rank's input, bytes (its mean: every rank sends as many rows)
    m = peers(rows, p, routing)
    if m == 0:  # every row stays on the rank: no message, no launch (the schedule is empty)
        return 0.0
    if m >= p - 1:  # every peer reached: the dense all-to-all
        return predict("all_to_all", "auto", n, group)
    alg, fabric = resolve("all_to_all", "auto", n, group)
    base = fabric.base_s(alg)
    p1, q = group.domain, group.domains
    up = fabric.link(0, 0)[1]
    out = fabric.link(0, p1)[1] if q > 1 else None

    def level(t, k: float, nbytes: float) -> float:  # k messages of nbytes on one port, then its latency
        return t.latency_s + k * (t.o_s + t.wire_s(nbytes)) if k > 0 else 0.0

    # each message: the rows bound for that peer (balanced: n / min(rows, p) each; uniform: the
    # rows to other ranks, (p - 1) / p of n, over the peers reached)
    size = n / min(rows, p) if routing == "balanced" else n * (p - 1) / p / m
    if alg == "direct":
        inside = min(p1, p) - 1
        if q == 1:
            return base + level(up, m, size)
        share = m / (p - 1)  # the reached peers spread over both classes
        return base + max(level(up, share * inside, size), level(out, share * (p - inside - 1), size))
    # hierarchical: to each domain peer j, my rows for local index j of every domain; then to each
    # other domain's rank of my index, what my domain holds for it
    one = _reached(rows, p1, routing)
    two = _reached(rows * p1, p, routing)
    return base + level(up, one * (p1 - 1), n / p1 / one) + level(out, two * (q - 1), n / q / two)

