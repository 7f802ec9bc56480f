"""The device as CUDA runs it (relay.kernels.timeline): FSDP2's implicit prefetch overlaps its
all-gathers with compute, on the emulated timeline, exactly as a hand-computed timeline says."""

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

from relay import System
from relay.hardware import chips
from relay.kernels.clock import VirtualLane
from relay.kernels.throttle import throttled_matmul

D, B, LAYERS = 2048, 4096, 3


def fsdp2_layers():
    """Three bias-free Linear layers, each an FSDP2 unit (kept gathered between forward and
    backward), trained three steps with SGD: every step all-gathers each layer once, in forward,
    and reduce-scatters its gradient in backward."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(D, D, bias=False) for _ in range(LAYERS)])
    for layer in model:
        fully_shard(layer, reshard_after_forward=False)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(B, D)
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture
def free_memory_h100(cluster8):
    """Two h100 whose only costs are their GEMMs: no launch, HBM as fast as it gets (so the
    copy-ins, copy-outs, casts and the optimizer cost nothing and the timeline is the GEMMs' and
    the collectives')."""
    chip = chips.get("h100").replace(name="h100-gemm-only", hbm_tbps=1e9)
    saved = cluster8.efficiency
    cluster8.configure(System(chip, 2), clock="virtual")
    cluster8.efficiency = {"launch_us": 0}
    try:
        yield cluster8, chip
    finally:
        cluster8.efficiency = saved


def _mm(chip, m, k, n) -> float:
    lane = VirtualLane()
    throttled_matmul(torch.empty(m, k), torch.empty(k, n), chip=chip, lane=lane, launch_us=0)
    return lane.t


def test_fsdp2_prefetch_overlaps_all_gathers_with_compute_as_by_hand(free_memory_h100):
    cluster, chip = free_memory_h100
    dev = cluster.launch(fsdp2_layers).per_device[0]
    prev, step = dev["steps"][1], dev["steps"][2]  # a steady step (the first lazily initialises FSDP2)
    spans = [s for s in dev["spans"] if s[1] >= prev["end_s"] - 1e-12]
    assert [s[0] for s in spans] == ["all_gather"] * 3 + ["reduce_scatter"] * 3
    ag, rs = spans[0][2] - spans[0][1], spans[3][2] - spans[3][1]  # the fabric's figures (fabric tests)
    fwd, d_input, d_weight = _mm(chip, B, D, D), _mm(chip, B, D, D), _mm(chip, D, B, D)
    assert fwd > ag  # a layer computes longer than the next one gathers: room to overlap

    # by hand. Forward: the all-gathers run back to back on their own stream (each waits only for
    # the previous one's copy-out, which costs nothing here); a layer starts once its own is in.
    s = prev["end_s"]
    gathered = [s + (i + 1) * ag for i in range(LAYERS)]
    t = s
    for i in range(LAYERS):
        t = max(t, gathered[i]) + fwd
    # backward, last layer first: the reduce-scatter of a layer's gradient is issued when its
    # backward is done (its stream waits for the compute stream) and runs when the link is free;
    # layer 0 needs no input gradient. The optimizer waits for the last reduce-scatter.
    link = gathered[-1]
    for i in reversed(range(LAYERS)):
        t += d_weight + (d_input if i else 0.0)
        link = max(t, link) + rs
    end = max(t, link)
    compute = LAYERS * (fwd + d_weight) + (LAYERS - 1) * d_input

    assert [s[1] for s in spans[:3]] == pytest.approx([s, s + ag, s + 2 * ag], rel=1e-9)
    assert step["step_s"] == pytest.approx(end - s, rel=1e-9)
    assert step["compute_s"] == pytest.approx(compute, rel=1e-9)
    assert step["exposed_comm_s"] == pytest.approx(end - s - compute, rel=1e-6)
    # well below the communication's total: on one lane (the host never ahead) it was all of it
    assert step["exposed_comm_s"] < 0.5 * step["comm_s"]
    assert step["comm_s"] == pytest.approx(3 * ag + 3 * rs, rel=1e-9)


def tp_and_ep_overlap():
    """A functional all-reduce (tensor parallel's, as DTensor issues it) with an independent GEMM
    before its result is used, then an async all-to-all (an expert dispatch) with the shared
    expert's GEMM before its wait. Returns the spans and the compute stream's figures."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    import relay.dist
    eng = relay.dist.context().engine
    x, w = torch.randn(B, D), torch.randn(D, D)
    relay.dist.restart_clocks()
    y = funcol.all_reduce(x, "sum", dist.group.WORLD)
    x @ w  # independent of the all-reduce: runs while it is in flight
    y + 1  # uses its result: waits for it
    routed = torch.empty_like(x)
    work = dist.all_to_all_single(routed, x, async_op=True)
    x @ w  # the shared expert, while the dispatch is in flight
    work.wait()
    return {"spans": list(eng.spans), "end": eng.compute.now(), "exposed": eng.exposed_s}


def test_tensor_and_expert_parallel_collectives_overlap_compute_as_by_hand(free_memory_h100):
    cluster, chip = free_memory_h100
    dev = cluster.launch(tp_and_ep_overlap).per_device[0]["result"]
    (ar, ar0, ar1, _), (a2a, a0, a1, _) = dev["spans"][-2:]
    assert (ar, a2a) == ("all_reduce", "all_to_all")
    gemm = _mm(chip, B, D, D)
    # by hand: the all-reduce starts at 0 beside the GEMM; the add waits for the later of the two;
    # the all-to-all is issued then and runs beside the second GEMM; the wait ends at the later
    assert ar0 == 0.0
    t = max(gemm, ar1)
    assert a0 == pytest.approx(t, rel=1e-9)
    assert dev["end"] == pytest.approx(max(t + gemm, a1), rel=1e-9)
    hidden = min(gemm, ar1) + min(gemm, a1 - a0)  # communication the GEMMs covered
    assert dev["exposed"] == pytest.approx((ar1 - ar0) + (a1 - a0) - hidden, rel=1e-6)
    assert hidden > 0
