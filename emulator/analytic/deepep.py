"""DeepEP's normal kernels, the expert dispatch and combine that training runs (NeMo AutoModel's
enable_deepep, Megatron-Core's flex dispatcher), for the plan model (planner.cost(dispatch="deepep")).

Relay's own runs, and the plan model by default, send a token once per expert it chose: top_k
copies in torch's all-to-all of the permuted rows. DeepEP's internode kernels send a token once per
scale-up domain it reaches, over the scale-out network (RDMA) to the rank of the sender's local
index there, which forwards it over the scale-up links (NVLink) to the ranks of that domain holding
its experts; inside the sender's own domain it goes straight over NVLink (github.com/deepseek-ai/
DeepEP README: "normal kernels ... forwarding data from NVLink domain to RDMA domain"). The combine
is the mirror image (reduced inside each domain, one copy back), and each one's backward is the
other, so every pass costs the same. The two legs run pipelined:

    seconds = base + max(rdma, nvlink)
    rdma    = out.latency + out.wire(n x remote domains a token reaches)
    nvlink  = up.latency + up.wire(n x ranks a token reaches x (p1 - 1) / p1)

n: a rank's tokens' bytes; p1: ranks of the ep group per domain, q: its domains; out, up: the
group's scale-out and scale-up links (collectives/fabric.py). What a token reaches depends on the
routing:
    grouped  its top_k experts contiguous and aligned (AutoModel's FakeBalancedGate sends token i to
             experts k i .. k i + k - 1 mod n_experts, nemo_automodel/components/moe/layers.py):
             ceil(k / experts per domain) domains, ceil(k / experts per rank) ranks, its domain
             a uniform one of the q
    uniform  each expert drawn uniformly: q (1 - (1 - 1/q)^k) domains and P (1 - (1 - 1/P)^k)
             ranks in expectation (P = p1 q ranks)
A remote domain is any but the sender's: (q - 1) / q of those reached. Not modelled: the SMs the
kernels take from compute while they run, DeepEP's host wait for the received counts, and
node-limited routing (DeepSeek-V3's router picks experts in at most 4 of its 8 groups, so a token
reaches at most 4 nodes where uniform routing gives 8 (1 - (7/8)^8) = 5.25 at 8 nodes).
"""

from __future__ import annotations

import math

from relay.errors import ConfigError

DISPATCHES = ("all_to_all", "deepep")  # planner.cost's: a copy per (token, expert), or DeepEP's
ROUTINGS = ("grouped", "uniform")


def check(dispatch: str, routing: str) -> None:
    """Refuses an unknown dispatch or routing by name (before any plan is measured)."""
    if dispatch not in DISPATCHES:
        raise ConfigError(f"dispatch = {dispatch!r} is not an expert dispatch; choose one of {', '.join(DISPATCHES)}")
    if routing not in ROUTINGS:
        raise ConfigError(f"routing = {routing!r} is not a DeepEP routing; choose one of {', '.join(ROUTINGS)}")


def reach(top_k: int, experts: int, p1: int, q: int, routing: str) -> tuple[float, float]:
    """(domains, ranks) one token's top_k experts reach, of `experts` spread evenly over an ep group
    of q domains of p1 ranks (expected under uniform routing)."""
    check("deepep", routing)
    ranks = p1 * q
    if routing == "grouped":
        return min(math.ceil(top_k * q / experts), q), min(math.ceil(top_k * ranks / experts), ranks)
    return q * (1 - (1 - 1 / q) ** top_k), ranks * (1 - (1 - 1 / ranks) ** top_k)


def seconds(n: float, top_k: int, experts: int, group, fabric, routing: str) -> float:
    """Emulated seconds of one DeepEP dispatch (or combine) of n bytes of tokens per rank over the
    ep group (`group`: its System, `fabric`: its Fabric, as planner._group gives them)."""
    p1, q = group.domain, group.domains
    if p1 * q <= 1 or n <= 0:
        return 0.0
    domains, ranks = reach(top_k, experts, p1, q, routing)
    up = fabric.link(0, 0)[1]
    nvlink = up.latency_s + up.wire_s(n * ranks * (p1 - 1) / p1) if p1 > 1 else 0.0
    rdma = 0.0
    if q > 1:
        out = fabric.link(0, p1)[1]
        rdma = out.latency_s + out.wire_s(n * domains * (q - 1) / q)
    return fabric.base_s() + max(rdma, nvlink)
