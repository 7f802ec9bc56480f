"""`relay launch`'s per-step figures: every optimizer.step() of an unmodified script marks a step
(torch's global optimizer-step hooks); steps.csv holds a row per device and step."""

import csv
import json

import pytest

from launch.cli import main

STEPS, TOKENS = 3, 96  # the script's optimizer steps, and the tokens it reports in each

SCRIPT = f"""
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import emulator.dist

dist.init_process_group("nccl")
torch.manual_seed(0)
model = DDP(nn.Linear(32, 8))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range({STEPS}):
    emulator.dist.report(tokens={TOKENS})  # before the step: counted in this step, not the next
    opt.zero_grad()
    model(torch.randn(4, 32)).square().mean().backward()
    opt.step()
dist.all_reduce(torch.ones(8))  # after the last step: in the device's total, in no step
dist.destroy_process_group()
"""
# Linear(32, 8): 264 fp32 parameters (1056 bytes); gradients and Adam's two moments as much
# again each, plus its step count (a 4-byte tensor) per parameter tensor (weight, bias)
MODEL_STATE_BYTES = 4 * 1056 + 2 * 4


def test_a_row_per_device_and_optimizer_step(cluster8, tmp_path, capsys):
    script = tmp_path / "adam.py"
    script.write_text(SCRIPT)
    assert main(["launch", "--chip", "h100", "--devices", "2", "--out", str(tmp_path), "--name", "s",
                 str(script)]) == 0
    out = capsys.readouterr().out
    assert "step (emulated ms)" in out and "model state (MiB, largest device)" in out
    assert "samples per emulated s: not known" in out  # reported tokens only: never invented
    folder = tmp_path / "s"
    with open(folder / "steps.csv") as fh:
        rows = list(csv.DictReader(fh))
    devices = {int(d["device"]): d for d in json.loads((folder / "summary.json").read_text())["devices"]}
    assert [(int(r["device"]), int(r["step"])) for r in rows] == [(d, k) for d in (0, 1) for k in range(STEPS)]
    for r in rows:
        step_s, compute_s = float(r["step_s"]), float(r["compute_s"])
        assert 0 < compute_s <= step_s < 0.01  # a lane advances at least by the compute charged to it
        assert 0 <= float(r["exposed_comm_s"]) <= float(r["comm_s"]) and float(r["comm_s"]) > 0  # DDP's
        assert int(r["tokens"]) == TOKENS and float(r["tokens_per_s"]) == pytest.approx(TOKENS / step_s)
        assert r["samples"] == r["samples_per_s"] == ""
        assert int(r["model_state_bytes"]) == MODEL_STATE_BYTES
    for d, dev in devices.items():  # the all_reduce after the last step is in the total only
        assert sum(float(r["step_s"]) for r in rows if int(r["device"]) == d) < dev["emulated_s"]
    steps = json.loads((folder / "summary.json").read_text())["steps"]
    assert [s["tokens"] for s in steps] == [2 * TOKENS] * STEPS
    trace = json.loads((folder / "trace.json").read_text())["traceEvents"]
    assert sorted((e["pid"], e["name"]) for e in trace if e["ph"] == "i") == \
        [(d, f"step {k} ends") for d in (0, 1) for k in range(STEPS)]
