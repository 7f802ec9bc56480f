"""Values of small integer tensors under `relay launch --tensors fake` (backend/fake_values.py): an
MoE program's routing counts, read as its all-to-all's split sizes, are those of balanced routing,
the round-robin torchtitan's own `--debug.moe_force_load_balance` routes with, where plain fake
tensors read 0."""

from __future__ import annotations

import torch
from _device import launched  # tests/unit is on the path (no package)

from relay.device.backend import fake_values

B, L, E, K, EP = 2, 8, 8, 3, 2


def route(forced: bool) -> tuple:
    """torchtitan's MoE routing and dispatch sizes (models/common/moe.py, token_dispatcher.py): the
    router's top-k (or its forced round-robin), the routing map, the counts per expert, the split
    sizes per EP rank read to the host, the expert-sorted order, and a float read."""
    scores = torch.randn(B, L, E, device="cuda")
    if forced:  # MoE router's _debug_force_load_balance_routing
        ids = torch.arange(B * L * K, device="cuda", dtype=torch.int64).reshape(B, L, K) % E
    else:
        ids = scores.topk(K, dim=-1).indices
    routing = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, ids, True)
    counts = routing.sum(dim=(0, 1))
    splits = counts.view(EP, -1).sum(dim=1).to(torch.device("cpu"), non_blocking=False).tolist()
    order = torch.argsort(ids.view(-1), stable=True) // K
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    return counts.tolist(), splits, order.tolist(), offsets[-1].item(), scores.sum().item()


def test_routing_counts_on_fake_tensors_are_balanced_routings():
    with launched(fake=False):
        torch.manual_seed(0)
        real_counts, real_splits, real_order, real_total, _ = route(forced=True)
    assert real_counts == [B * L * K // E] * E and real_splits == [B * L * K // EP] * EP
    for forced in (True, False):  # torchtitan's forced round-robin, and its top-k, on fake tensors
        with launched(fake=True):
            counts, splits, order, total, float_read = route(forced)
        assert (counts, splits, order, total) == (real_counts, real_splits, real_order, real_total), forced
        assert float_read == 0  # the model's data: no value


def test_a_value_is_dropped_where_an_in_place_op_reads_an_unknown_one():
    with launched(fake=True):
        counts = torch.zeros(E, dtype=torch.int64, device="cuda")
        assert counts.tolist() == [0] * E and fake_values.of(counts) is not None
        counts.add_(torch.randint(0, 3, (E,), device="cuda"))  # random: no value
        assert fake_values.of(counts) is None and counts[0].item() == 0
        huge = torch.zeros(fake_values.LIMIT + 1, dtype=torch.int8, device="cuda")
        assert fake_values.of(huge) is None  # beyond LIMIT elements: no value kept


def test_a_write_without_a_value_reaches_every_view_and_empty_carries_none():
    with launched(fake=True):
        x = torch.zeros(8, dtype=torch.int64, device="cuda")
        view = x[:4]
        view.add_(torch.randint(0, 3, (4,), device="cuda"))  # random: what it writes has no value
        assert fake_values.of(x) is None and fake_values.of(view) is None
        assert fake_values.of(torch.empty_like(torch.arange(3, device="cuda"))) is None
        m = torch.zeros_like(torch.empty(4, 6, device="cuda").t(), dtype=torch.int64) + 2  # strided, as fake mode
        assert m.t().reshape(-1).tolist() == [2] * 24
        picked = torch.topk(torch.arange(8, device="cuda") * 3 % 8, 3).indices  # over values: the real top-k
        assert picked.tolist() == [5, 2, 7]


def test_collectives_give_values_only_by_the_all_to_all_rule():
    """A functional all-to-all of equal splits gives this rank's chunk of every peer's input (every
    rank's input this rank's: balanced counts); other collectives' outputs carry none and are never
    run on the values (a second collective would leave the device)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    F = torch.ops._c10d_functional
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        name = dist.group.WORLD.group_name
        with FakeTensorMode():
            counts, out, other = (torch.empty(2, 3, dtype=torch.int64) for _ in range(3))
        fake_values._set(counts, torch.tensor([[1, 2, 3], [4, 5, 6]]))  # (as an op gives it one)
        fake_values.after(F.all_to_all_single.default, (counts, [1, 1], [1, 1], name), {}, out)
        assert fake_values.of(out).tolist() == [[4, 5, 6], [4, 5, 6]]  # rank 1 receives row 1 from both
        fake_values.after(F.all_reduce.default, (counts, "sum", name), {}, other)
        assert fake_values.of(other) is None
    finally:
        dist.destroy_process_group()
