"""Process groups on the emulated system: a group's own System and Fabric (device/backend/collective.py),
and the algorithm a group may run."""

import pytest

from relay import System
from relay.collectives import Fabric, simulate
from relay.device.backend.collective import TWO_LEVEL, algorithms, choose, group_of


def test_a_group_inside_a_domain_uses_its_links():
    system = System("h100", 8, domain=4)
    group = lambda members: group_of(system, Fabric.of(system), members, members[0])  # noqa: E731
    inside, across = group([0, 1]), group([0, 4])
    assert (inside.system.domains, across.system.domains) == (1, 2) and inside.regular and across.regular
    # 450 GB/s NVLink inside the domain, 50 GB/s scale-out across
    ring = lambda g: simulate("all_reduce", "ring", 2**26, g.system)  # noqa: E731
    assert ring(across) > 3 * ring(inside)
    assert not group([0, 1, 4]).regular  # 2 + 1 members: no two equal levels
    # the group's fabric times each message on its two devices' link, whatever their group ranks
    assert [group([2, 5, 3]).fabric.link(i, j)[0] for i, j in ((0, 1), (0, 2), (1, 2))] == ["out", "up", "out"]


def test_a_group_without_two_equal_levels_runs_flat():
    system = System("h100", 8, domain=4)
    g = group_of(system, Fabric.of(system), [0, 1, 4], 0)
    assert choose("all_reduce", "hierarchical", 2**20, g, g.fabric)[0] == "ring"
    assert choose("all_to_all", "hierarchical", 2**20, g, g.fabric)[0] == "direct"
    assert choose("all_reduce", "auto", 2**26, g, g.fabric)[0] not in TWO_LEVEL


def test_algorithm_choices_per_primitive():
    assert algorithms() == {p: "auto" for p in algorithms()}
    assert algorithms("ring")["all_to_all"] == "auto" and algorithms("ring")["all_reduce"] == "ring"
    assert algorithms({"all_to_all": "hierarchical"})["all_to_all"] == "hierarchical"
    with pytest.raises(ValueError, match="'ring' does not run all_to_all"):
        algorithms({"all_to_all": "ring"})


def test_a_dispatch_sized_by_fake_data_is_refused_naming_why():
    """An MoE router's token counts read from fake tensors are 0 (they hold no data): the all-to-all
    they size is refused with the reason and the fixes (torchtitan's DeepSeek-V3 on fake tensors),
    where splits that do not add up on real tensors keep the plain error."""
    from types import SimpleNamespace

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from relay.device.backend.group import RelayProcessGroup

    pg = SimpleNamespace(g=SimpleNamespace(size=2))  # the argument check reads the group's size alone
    with FakeTensorMode():
        routed, out = torch.empty(96, 8), torch.empty(0, 8)
    with pytest.raises(ValueError, match="on fake tensors a size read from a tensor is 0.*balanced-routing plans"):
        RelayProcessGroup.all_to_all_single(pg, out, routed, [0, 0], [0, 0])
    with pytest.raises(ValueError, match=r"do not add up to the input \(96, 8\) / output \(0, 8\)$"):
        RelayProcessGroup.all_to_all_single(pg, torch.empty(0, 8), torch.empty(96, 8), [0, 0], [0, 0])
