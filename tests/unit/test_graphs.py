"""Decode as serving systems run it, a captured graph (kernels/graphs.py): every kernel of the
decode step charged the graph's per-kernel gap instead of the eager launch cost, and nothing else;
prefill eager either way; `relay serve --eager-decode` keeps the eager decode."""

import pytest
import torch
from _device import one_thread  # noqa: F401  (tests/unit is on the path)
from torch._subclasses.fake_tensor import FakeTensorMode

from relay import System, chips
from relay.analytic import serving
from relay.kernels import graphs
from relay.kernels.clock import VirtualLane
from relay.kernels.cost import CostModel
from relay.kernels.throttle import Throttle
from relay.launch import cli
from relay.workloads import inference

H100x4 = System("h100", 4)
LAYOUT = serving.Layout(4, 1, 4)

pytestmark = pytest.mark.usefixtures("one_thread")


def _kernels(workload: str, batch: int, context: int) -> int:
    """The kernels one decode step of the whole model launches on a device of LAYOUT, counted by a
    throttle (every kernel costs at least its launch, so each is one charged op)."""
    c = serving.config_of(workload, context)
    with torch.device("meta"):
        model = serving._model(workload, c, 1, c.n_experts // LAYOUT.ep, c.n_layers, c.n_dense_layers)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = model.to_empty(device="cpu")
    with mode, torch.no_grad():
        cache = inference.new_cache(model, batch, context)
        cache.length = context - 1
        idx = torch.zeros(batch, 1, dtype=torch.long)
        throttle = Throttle(CostModel(chips.get("h100")), VirtualLane())
        with throttle:
            inference.forward(model, idx, cache)
    return throttle.ops


def test_a_captured_decode_saves_the_launch_gap_of_every_kernel_and_nothing_else():
    graph, eager = (serving.serve("moe-debug", H100x4, LAYOUT, 3, 16, 8, overlap=False, graphs=g)
                    for g in (True, False))
    assert graph.prefill == eager.prefill  # prefill runs eagerly either way
    assert not graph.prefill.graphs and graph.decode.graphs and not eager.decode.graphs
    d, e = graph.decode, eager.decode
    assert (d.flops, d.bytes, d.a2a_s, d.params) == (e.flops, e.bytes, e.a2a_s, e.params)
    saved = (chips.get("h100").launch_us - graphs.GRAPH_LAUNCH_US) * 1e-6  # per kernel, emulated s
    kernels = _kernels("moe-debug", 3, 16 + 8 // 2)
    assert kernels > 100
    # every kernel of the whole model's decode saves the same gap (the serving model composes the
    # step from blocks: serving.step's base + blocks x (one block - base), 207 kernels here)
    assert e.compute_s - d.compute_s == pytest.approx(kernels * saved, rel=1e-9)
    assert e.seconds - d.seconds == pytest.approx(e.compute_s - d.compute_s, rel=1e-9)
    assert graph.tpot_s < eager.tpot_s and graph.decode_tps > eager.decode_tps


def test_two_micro_batches_are_captured_too():
    """SGLang captures its two-batch overlap in the decode graphs: each half's MoE stages (tbo.stages,
    which the two-micro-batch schedule times) are charged at the graph rate, adding up to the
    captured block's cost as the eager stages add up to the eager block's."""
    from relay.analytic import tbo
    c = serving.config_of("moe-debug", 20)
    for g in (True, False):
        block = serving.step("moe-debug", LAYOUT, "h100", "bf16", 3, 1, 20, "fake", g)["moe"][0].seconds
        stages = tbo.stages(serving._model, serving.ServingCost, "moe-debug", c, 1, 2, "h100", "bf16", 3, 1, 20,
                            graphs.launch_us(g))
        assert sum(stages) == pytest.approx(block, rel=1e-12)
    two = [serving._phase("moe-debug", LAYOUT, H100x4, "bf16", (3, 3), 1, 20, "fake", "balanced", g)
           for g in (True, False)]
    assert two[0].micro == 2 and two[0].graphs and two[0].flops == two[1].flops
    assert two[0].seconds < two[1].seconds


def test_cli_decode_is_captured_unless_eager_decode(capsys):
    argv = ["serve", "--chip", "h100", "--devices", "4", "--workload", "moe-debug", "--input-len", "16",
            "--output-len", "8", "--batch", "3", "--parallel", "dp=4,tp=1,ep=4", "--no-overlap"]
    tpot = {}
    for extra in ([], ["--eager-decode"]):
        assert cli.main(argv + extra) == 0
        out = capsys.readouterr().out
        head, decode = out.splitlines()[0], next(x for x in out.splitlines() if x.startswith("decode"))
        assert ("decode eager" in head) == bool(extra)
        assert ("decode as a captured graph (0.5 us a kernel)" in head) != bool(extra)
        tpot[bool(extra)] = float(decode.split()[4])
    model = {g: serving.serve("moe-debug", H100x4, LAYOUT, 3, 16, 8, overlap=False, graphs=g).tpot_s * 1e3
             for g in (True, False)}
    assert tpot == {False: pytest.approx(model[True], abs=0.005), True: pytest.approx(model[False], abs=0.005)}
