"""The calibrated fabric between real actors: NVLS, the pipelined hierarchical all-reduce and
`auto` move the right data and give the local executor's virtual time to the bit."""

import pytest
import torch

from emulator import System
from emulator.collectives import simulate


@pytest.mark.parametrize("algorithm,domain", [("nvls", 8), ("hier_pipelined", 4), ("auto", 8), ("auto", 4)])
def test_new_algorithms_between_actors(cluster, algorithm, domain):
    system = System("h100", 8, domain=domain)
    cluster.configure(system, clock="virtual")
    cases = [(1, "float32"), (8 * 37 + 3, "bfloat16"), (3 * 2**16 + 5, "float32")]
    for (numel, dtype), res in zip(cases, cluster.collectives("all_reduce", cases, algorithm)):
        assert all(torch.equal(o, torch.full((numel,), 8.0, dtype=getattr(torch, dtype))) for o in res.outputs)
        elem = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
        assert res.emulated_s == simulate("all_reduce", algorithm, numel * elem, system, dtype=dtype)
