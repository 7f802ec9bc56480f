"""The calibrated fabric between real actors: NVLS, the pipelined hierarchical all-reduce and
`auto` move the right data and give the local executor's virtual time to the bit."""

import pytest
import torch

from relay import System
from relay.collectives import predict, resolve, simulate


@pytest.mark.parametrize("algorithm,domain", [("nvls", 8), ("hier_pipelined", 4), ("auto", 8), ("auto", 4)])
def test_new_algorithms_between_actors(cluster, algorithm, domain):
    system = System("h100", 8, domain=domain)
    cluster.configure(system, clock="virtual")
    cases = [(1, "float32"), (8 * 37 + 3, "bfloat16"), (3 * 2**16 + 5, "float32")]
    for (numel, dtype), res in zip(cases, cluster.collectives("all_reduce", cases, algorithm)):
        assert all(torch.equal(o, torch.full((numel,), 8.0, dtype=getattr(torch, dtype))) for o in res.outputs)
        elem = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
        assert res.emulated_s == simulate("all_reduce", algorithm, numel * elem, system, dtype=dtype)


def test_chunked_messages_between_actors(cluster):
    """A ring step of 1.07 chunks on NVLink 4 (two handshakes): the actors move the data and give
    the local executor's virtual time to the bit, which equals the closed form."""
    system = System("h100", 2)
    cluster.configure(system, clock="virtual")
    numel = 8_400_000  # float32: 16.8 MB a step, just over one 16 MiB chunk
    fabric = resolve("all_reduce", "ring", numel * 4, system)[1]
    assert fabric.protocol == "simple" and fabric.link(0, 1)[1].chunks(numel * 4 / 2) == 2
    res = cluster.collectives("all_reduce", [(numel, "float32")], "ring")[0]
    assert all(torch.equal(o, torch.full((numel,), 2.0)) for o in res.outputs)
    assert res.emulated_s == simulate("all_reduce", "ring", numel * 4, system)
    assert res.emulated_s == pytest.approx(predict("all_reduce", "ring", numel * 4, system), rel=1e-9)


@pytest.mark.parametrize("algorithm", ["sharp", "auto"])
def test_sharp_between_actors(cluster, algorithm):
    """In-network reduction across two domains of 4: right data, the local executor's time to the bit."""
    system = System("h100", 8, domain=4, sharp=True)
    cluster.configure(system, clock="virtual")
    cases = [(8 * 37 + 3, "float32"), (3 * 2**16 + 5, "bfloat16")]
    for (numel, dtype), res in zip(cases, cluster.collectives("all_reduce", cases, algorithm)):
        assert all(torch.equal(o, torch.full((numel,), 8.0, dtype=getattr(torch, dtype))) for o in res.outputs)
        elem = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
        assert res.emulated_s == simulate("all_reduce", algorithm, numel * elem, system, dtype=dtype)
