"""The `relay` torch.distributed backend on real device actors: every operation against a direct
reference and its emulated time against `simulate`; unmodified PyTorch programs (DDP, FSDP2, 2-D
tensor parallelism, a pipeline, expert parallelism) against one-process training; DDP's overlap.

Tolerance for training: 1e-5 absolute on every weight after 3 SGD steps (fp32; the devices sum
gradients in another order than one process does)."""

import json
from pathlib import Path

import _programs as P  # tests/ray is on the path (no package)
import pytest
import torch

from emulator import System
from emulator.collectives import Fabric, simulate
from emulator.device.collective import TWO_LEVEL, algorithms, choose, group_of
from emulator.device.program import Program
from emulator.driver.programs import launch
from launch.cli import main

TOL = 1e-5


@pytest.mark.parametrize("world,algorithm", [(2, None), (3, None), (8, "hierarchical")])
def test_every_operation_equals_the_reference_and_simulate(cluster, world, algorithm):
    system = System("h100", world, domain=max(1, world // 2))
    cluster.configure(system, clock="virtual")
    res = launch(cluster, Program(P.every_operation, algorithm=algorithm))
    chosen = algorithms(algorithm)
    for d in res.per_device:
        bad, times = d["result"]
        assert bad == []
    timings = list(zip(*[d["result"][1] for d in res.per_device]))
    assert len(timings) > 20
    for per_device in timings:
        primitive, members, nbytes, dtype, options, _ = per_device[0]
        group = group_of(system, Fabric.of(system), members, members[0])
        alg = chosen[primitive]
        if alg in TWO_LEVEL and not group.regular:  # a group without two equal levels runs flat
            alg = choose(primitive, alg, nbytes or 0, group, group.fabric)[0]
        ends = [t[-1] for t in per_device if t[-1] is not None]
        want = simulate(primitive, alg, nbytes or 0, group.system, dtype=dtype, **options)
        assert max(ends) == want, (primitive, members, nbytes, dtype, alg)


@pytest.fixture(scope="module")
def programs(cluster8):
    cluster8.configure(System("h100", 4, domain=2), clock="virtual")
    return cluster8.launch(P.all_programs)


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "tp"])
def test_data_fsdp_and_tensor_parallel_training_equal_one_process(programs, name):
    ref = P.reference()
    for d in programs.per_device:
        got = d["result"][name]
        for k, v in ref.items():
            torch.testing.assert_close(got[k], v, atol=TOL, rtol=0)
    if name == "tp":  # the mesh's tensor-parallel dimension is a scale-up domain
        assert [d["result"]["tp"]["tp_group"] for d in programs.per_device] == [[0, 1], [0, 1], [2, 3], [2, 3]]


def test_pipeline_training_equals_one_process(programs):
    ref = P.reference()
    for d in programs.per_device:
        got = d["result"]["pipeline"]
        assert got and all(k.startswith("0." if d["device"] % 2 == 0 else "2.") for k in got)
        for k, v in got.items():
            torch.testing.assert_close(v, ref[k], atol=TOL, rtol=0)


def test_expert_parallel_moe_equals_one_process(programs):
    ref = P.moe_reference(4)
    for d in programs.per_device:
        for k, v in d["result"]["moe"].items():
            torch.testing.assert_close(v, ref[k], atol=TOL, rtol=0)


def test_ddp_all_reduce_overlaps_backward(programs):
    for d in programs.per_device:
        o = d["result"]["overlap"]
        assert o["all_reduces"] == 2 * 4  # a bucket per layer (10 kB cap, 16 kB weights), two steps
        assert 0 <= o["exposed_comm_s"] < o["comm_s"]
        assert d["comm_s"] > 0 and d["compute_s"] > 0 and d["emulated_s"] > 0


def test_readme_script_runs_unmodified_through_relay_launch(cluster8, tmp_path, capsys):
    """The README's example, as written, through the command line (a cluster of its own on the
    session's Ray)."""
    script = Path(__file__).resolve().parents[2] / "examples" / "torch_ddp.py"
    assert main(["launch", "--chip", "h100", "--devices", "4", "--domain", "2", "--out", str(tmp_path),
                 "--name", "ddp", str(script)]) == 0
    out = capsys.readouterr().out
    assert "samples per emulated s" in out and "exposed comm (emulated ms)" in out
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())["summary"]
    assert summary["samples_per_s"] == pytest.approx(4 * 5 * 16 / summary["emulated_s"])
    assert 0 <= summary["exposed_comm_s"] <= summary["comm_s"] and summary["comm_s"] > 0
    trace = json.loads((tmp_path / "ddp" / "trace.json").read_text())["traceEvents"]
    assert {e["pid"] for e in trace} == {0, 1, 2, 3} and any(e["name"] == "all_reduce" for e in trace)


def test_every_operation_on_tensors_smaller_than_the_group(cluster):
    """Reductions of every op, and every other operation, on 0, 1, world-1 and world+1 elements
    in six dtypes, on 3 devices over shared memory (a one-element MAX is torchtitan's loss)."""
    cluster.configure(System("h100", 3, domain=3), clock="virtual")
    res = launch(cluster, Program(P.small_tensors))
    bad = [b for d in res.per_device for b in d["result"]]
    assert bad == [], "\n".join(bad)
