"""The `relay` torch.distributed backend on real device actors: every operation against a direct
reference and its emulated time against `simulate`; unmodified PyTorch programs (DDP, FSDP2, 2-D
tensor parallelism, a pipeline, expert parallelism) against one-process training; DDP's overlap.

Tolerance for training: 1e-5 absolute on every weight after 3 SGD steps (fp32; the devices sum
gradients in another order than one process does)."""

import csv
import json
from pathlib import Path

import _programs as P  # tests/ray is on the path (no package)
import pytest
import torch

from relay import System
from relay.collectives import Fabric, simulate
from relay.device.backend.collective import TWO_LEVEL, algorithms, choose, group_of
from relay.device.backend.program import Program
from relay.driver.programs import launch
from relay.launch.cli import main

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
        assert d["steps"] == []  # no optimizer stepped: no steps (the totals stand alone)
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
    # rank 0's output on the console as torchrun shows it, Relay's own notice included; every
    # rank's in its log
    assert "[rank 0] step 4: loss " in out and "[rank 1]" not in out
    assert "[rank 0] relay: init_process_group(backend='gloo') runs on the 'relay' backend" in out
    logs = tmp_path / "ddp" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == [f"rank{r}.log" for r in range(4)]
    assert [x for x in (logs / "rank0.log").read_text().splitlines() if x.startswith("step")] == \
        [x.removeprefix("[rank 0] ") for x in out.splitlines() if x.startswith("[rank 0] step")]
    assert len(out.split("[rank 0] step ")) == 6
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())["summary"]
    assert summary["samples_per_s"] == pytest.approx(4 * 5 * 16 / summary["emulated_s"])
    assert 0 <= summary["exposed_comm_s"] <= summary["comm_s"] and summary["comm_s"] > 0
    trace = json.loads((tmp_path / "ddp" / "trace.json").read_text())["traceEvents"]
    assert {e["pid"] for e in trace} == {0, 1, 2, 3} and any(e["name"] == "all_reduce" for e in trace)
    # each optimizer.step() marks a step (device/backend/steps.py): a row per device and step
    assert "step (emulated ms)" in out and "tokens per emulated s: not known" in out
    with open(tmp_path / "ddp" / "steps.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(int(r["device"]), int(r["step"])) for r in rows] == [(d, k) for d in range(4) for k in range(5)]
    for r in rows:  # a lane advances at least by the compute charged to it; DDP all-reduces every step
        assert 0 < float(r["compute_s"]) <= float(r["step_s"]) < 0.01 and float(r["comm_s"]) > 0
        assert int(r["samples"]) == 16 and r["tokens"] == ""  # reported after each step; tokens never
        assert int(r["model_state_bytes"]) == 2 * 4 * (32 * 64 + 64 + 64 + 1)  # fp32 parameters, gradients
    assert sorted((e["pid"], e["name"]) for e in trace if e["ph"] == "i") == \
        [(d, f"step {k} ends") for d in range(4) for k in range(5)]


BOOM = """import os, sys
print(f"args {sys.argv[1:]} on rank {os.environ['RANK']}")
def step(lr):
    return lr + "x"
step(float(sys.argv[2]))
"""


def test_a_failing_module_keeps_its_traceback_and_every_ranks_output(ray_session, tmp_path, monkeypatch, capsys):
    """`relay launch -m pkg.module args`, as torchrun -m: it runs the module found from the current
    directory with its arguments, shows every rank's output (--ranks all), and when it raises
    keeps the traceback in the error, error.txt and each rank's log."""
    (tmp_path / "boom_pkg").mkdir()
    (tmp_path / "boom_pkg" / "__init__.py").write_text("")
    (tmp_path / "boom_pkg" / "train.py").write_text(BOOM)
    path = str(tmp_path / "boom_pkg" / "train.py")
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "--chip", "h100", "--devices", "2", "--ranks", "all", "--out", str(tmp_path),
                 "--name", "boom", "-m", "boom_pkg.train", "--lr", "0.1"]) == 1
    out, err = capsys.readouterr()
    error = "TypeError: unsupported operand type(s) for +: 'float' and 'str'"
    for r in (0, 1):
        assert f"[rank {r}] args ['--lr', '0.1'] on rank {r}" in out and f"[rank {r}] {error}" in out
        log = (tmp_path / "boom" / "logs" / f"rank{r}.log").read_text()
        assert log.startswith(f"args ['--lr', '0.1'] on rank {r}\nTraceback") and log.endswith(error + "\n")
    assert "run failed: device " in err and f"failed during launch: {error} (at {path}:4)" in err
    assert f'    File "{path}", line 4, in step' in err and f"  {error}" in err  # the traceback's last lines
    assert str(tmp_path / "boom" / "error.txt") in err
    report = (tmp_path / "boom" / "error.txt").read_text()
    assert f'File "{path}", line 5, in <module>' in report and f'File "{path}", line 4, in step' in report
    assert "runpy" not in report


def test_a_run_refused_before_it_starts_leaves_no_results_folder(ray_session, tmp_path, capsys):
    script = Path(__file__).resolve().parents[2] / "examples" / "torch_ddp.py"
    assert main(["launch", "--chip", "h100", "--devices", "5000", "--out", str(tmp_path / "results"),
                 "--name", "big", str(script)]) == 2
    assert "the Ray cluster has room for" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
    # refused under the name of an earlier run: that run's logs stay (they go only once devices start)
    earlier = tmp_path / "kept" / "big" / "logs" / "rank0.log"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("step 0: loss 1.0\n")
    assert main(["launch", "--chip", "h100", "--devices", "5000", "--out", str(tmp_path / "kept"),
                 "--name", "big", str(script)]) == 2
    assert earlier.read_text() == "step 0: loss 1.0\n" and "[rank 0]" not in capsys.readouterr().out


def test_every_operation_on_tensors_smaller_than_the_group(cluster):
    """Reductions of every op, and every other operation, on 0, 1, world-1 and world+1 elements
    in six dtypes, on 3 devices over shared memory (a one-element MAX is torchtitan's loss)."""
    cluster.configure(System("h100", 3, domain=3), clock="virtual")
    res = launch(cluster, Program(P.small_tensors))
    bad = [b for d in res.per_device for b in d["result"]]
    assert bad == [], "\n".join(bad)
