"""Shared runs of launched programs (driver/launch_shared.py): `relay launch --tensors fake --shared`
runs rank 0 alone and replays every device from its recording. Where a launch of one process per
device also fits, every device's emulated figures must be the same, to the bit."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from relay import System
from relay.device.backend.program import Program
from relay.driver.launch_shared import check
from relay.driver.programs import launch
from relay.errors import ConfigError
from relay.launch.cli import main

ROOT = Path(__file__).resolve().parents[2]
# FSDP2 over a "cuda" mesh of every rank, each doing the same work (examples/gpu_train.py is not:
# its rank 0 alone reads the loss, a host sync, which a shared run would charge every device)
SCRIPT = str(ROOT / "tests" / "ray" / "programs" / "fsdp_every_rank.py")
ARGS = ("512", "64", "3")  # width, batch, steps
DEVICE = ("emulated_s", "compute_s", "comm_s", "exposed_comm_s")
STEP = ("step", "step_s", "compute_s", "comm_s", "exposed_comm_s", "model_state_bytes")
LINE = re.compile(r"step (\d): ([\d.]+) ms")


def test_shared_launch_equals_one_process_per_device(cluster, tmp_path, capsys):
    """The README's shared command on 4 emulated H100 in 2 domains (FSDP2's all-gathers and
    reduce-scatters across both links) against the same program on one process per device."""
    cluster.configure(System("h100", 4, domain=2), clock="virtual")
    (tmp_path / "full").mkdir()
    full = launch(cluster, Program(script=SCRIPT, argv=ARGS, log_dir=str(tmp_path / "full")), tensors="fake")
    assert main(["launch", "--chip", "h100", "--devices", "4", "--domain", "2", "--tensors", "fake", "--shared",
                 "--out", str(tmp_path), "--name", "shared", SCRIPT, *ARGS]) == 0
    out = capsys.readouterr().out
    assert "fake tensors, shared: 1 device(s) ran, every device replayed" in out
    folder = tmp_path / "shared"
    devices = json.loads((folder / "summary.json").read_text())["devices"]
    assert [d["device"] for d in devices] == [0, 1, 2, 3]
    for mine, theirs in zip(devices, full.per_device):
        assert {k: mine[k] for k in DEVICE} == {k: theirs[k] for k in DEVICE}
    with open(folder / "steps.csv") as fh:
        steps = [{k: float(r[k]) for k in STEP} for r in csv.DictReader(fh)]
    assert steps == [{k: float(r[k]) for k in STEP} for r in full.step_rows()] and len(steps) == 12
    last = full.per_device[0]
    assert 0 < last["exposed_comm_s"] < last["comm_s"]  # FSDP2's gathers overlap the compute
    # the program's output is the representative's: its own lines, timed by its clock with the
    # collectives it waited for (each timed as if its peers started it with it: they do here)
    ran = LINE.findall((tmp_path / "full" / "rank0.log").read_text())
    assert LINE.findall("\n".join(x for x in out.splitlines() if x.startswith("[rank 0] "))) == ran
    assert len(ran) == 3 and float(ran[-1][1]) > 0
    assert sorted(p.name for p in (folder / "logs").iterdir()) == ["rank0.log"]


def test_shared_launch_refuses_what_it_cannot_replay(cluster):
    """Before any worker starts: real tensors, a plan of another size, a hint without --shared."""
    program = Program(script=SCRIPT, argv=ARGS)
    with pytest.raises(ConfigError, match=r"shared = True needs tensors = 'fake'"):
        check(cluster, program, "real", None)
    with pytest.raises(ConfigError, match=r"covers 8 devices, the system has 4"):
        check(cluster, program, "fake", "dp=4,tp=2")
    with pytest.raises(ConfigError, match=r"hint for shared runs only"):
        launch(cluster, program, tensors="fake", plan="dp=4")
