"""Per-step figures of an unmodified program (emulator/device/backend/steps.py), in one process: a real
optimizer loop under a real throttle, clock and engine (a device with no peers), and a launched
program's results folder."""

import csv

import pytest
import torch
from torch import nn

import relay.dist as relay_dist
from relay import System
from relay.collectives import Fabric
from relay.device.backend.engine import Engine
from relay.device.backend.steps import STEP_COLUMNS, StepMarks, aggregate
from relay.driver.programs import LaunchResult
from relay.hardware import chips
from relay.kernels.clock import VirtualLane
from relay.kernels.cost import CostModel
from relay.kernels.throttle import Throttle
from relay.results.folder import ResultsDir
from relay.results.write import write_launch


class Wrapper(torch.optim.Optimizer):
    """An optimizer whose step runs another's (as ZeroRedundancyOptimizer's does)."""

    def __init__(self, inner):
        self.inner = inner
        super().__init__(inner.param_groups[0]["params"], {})

    def step(self, closure=None):
        self.inner.step()


@pytest.fixture
def device():
    """A device alone: its compute lane, throttle and engine, and a running program's context."""
    system, lane = System("h100", 1), VirtualLane()
    engine = Engine(0, None, system, Fabric.of(system), lane, VirtualLane(), 10.0)
    throttle = Throttle(CostModel(chips.get("h100")), lane)
    relay_dist._current = relay_dist.Context(0, 1, system, "virtual", engine, throttle=throttle)
    yield lane, throttle, engine, relay_dist._current.counts
    relay_dist._current = None
    engine.close()


def train(marks, throttle, steps: int, *, report_before: bool, wrap: bool = False, optimizer=torch.optim.SGD):
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    opt = optimizer(model.parameters(), lr=0.1)
    opt = Wrapper(opt) if wrap else opt
    with throttle, marks:
        for k in range(steps):
            if report_before:
                relay_dist.report(samples=8 + k)
            model(torch.randn(8 + k, 16)).sum().backward()
            opt.step()
            if not report_before:
                relay_dist.report(samples=8 + k)
        model(torch.randn(4, 16))  # after the last step: in no step


# Linear(16, 4): 68 fp32 parameters (272 bytes), as much again of gradients; Adam keeps two
# moments as large and a step count (a 4-byte tensor) per parameter tensor, SGD nothing
@pytest.mark.parametrize("report_before,optimizer,state_bytes", [(True, torch.optim.Adam, 4 * 272 + 2 * 4),
                                                                 (False, torch.optim.SGD, 2 * 272)])
def test_a_step_per_optimizer_step_with_the_samples_reported_in_it(device, report_before, optimizer, state_bytes):
    lane, throttle, engine, counts = device
    marks = StepMarks(lane, throttle, engine, counts)
    train(marks, throttle, 3, report_before=report_before, optimizer=optimizer)
    rows = marks.rows(device=0)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["samples"] for r in rows] == [8, 9, 10]  # either way a script reports, not shifted by one
    assert [r["tokens"] for r in rows] == [None] * 3  # never reported: unknown, not 0
    for r in rows:
        assert 0 < r["compute_s"] <= r["step_s"] and r["samples_per_s"] == r["samples"] / r["step_s"]
        assert r["model_state_bytes"] == state_bytes
    assert sum(r["step_s"] for r in rows) < lane.now()  # the forward after the last step is in no step
    assert sum(r["compute_s"] for r in rows) < throttle.emulated_s


def test_a_wrapped_optimizer_marks_one_step_and_the_hooks_go_with_the_program(device):
    lane, throttle, engine, counts = device
    marks = StepMarks(lane, throttle, engine, counts)
    train(marks, throttle, 2, report_before=True, wrap=True)
    assert len(marks.rows(0)) == 2
    model = nn.Linear(2, 1)  # after the program: its hooks are gone
    model(torch.ones(2)).sum().backward()
    torch.optim.SGD(model.parameters()).step()
    assert len(marks.marks) == 2


def test_steps_of_all_devices_end_with_the_last_device():
    def row(k, end_s, samples):
        return {"step": k, "end_s": end_s, "step_s": 0.0, "compute_s": 0.1, "comm_s": 0.0, "exposed_comm_s": 0.0,
                "model_state_bytes": 100 * (1 + k), "wall_s": 0.0, "samples": samples, "tokens": None}
    steps = aggregate([[row(0, 1.0, 4), row(1, 2.0, 4)], [row(0, 1.5, 4), row(1, 2.25, 4)]])
    assert [s["step_s"] for s in steps] == [1.5, 0.75]
    assert [s["samples_per_s"] for s in steps] == [8 / 1.5, 8 / 0.75]
    assert [s["tokens_per_s"] for s in steps] == [None, None] and steps[1]["model_state_bytes"] == 200


def test_a_program_without_an_optimizer_has_a_total_and_no_steps(tmp_path):
    device = {"device": 0, "result": None, "emulated_s": 0.5, "compute_s": 0.2, "comm_s": 0.3, "exposed_comm_s": 0.3,
              "flops": 1.0, "spans": [], "counts": {}, "steps": [], "real_s": 1.0, "fidelity": 1.0}
    out = ResultsDir(tmp_path, "r")
    summary = write_launch(out, {}, LaunchResult([device], {"clock": "virtual"}))
    with open(out.path / "steps.csv") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == STEP_COLUMNS and list(reader) == []
    assert summary["steps"] == [] and summary["summary"]["emulated_s"] == 0.5
