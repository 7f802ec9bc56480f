"""torchtitan 0.3.0 as it ships (PyPI, pinned in the dev extra) through `relay launch -m
torchtitan.train`: the llama3 debug model under FSDP on 2 emulated H100, real tensors. Its own
loss and grad-norm lines equal plain torchrun's, run beside it on the same host
(bench/titan_reference.py; longer runs and FSDP x TP: bench/titan_runs.py), and its own
throughput, MFU and memory lines are emulated figures."""

from __future__ import annotations

import csv
import os
import re
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from relay.device.plane.transport import listening_fd
from relay.launch.cli import main

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets" / "torchtitan"
SEQ, BATCH = 128, 2
ARGS = ["--module", "llama3", "--config", "llama3_debugmodel",
        "--training.disable_cuda_graphs",  # torchtitan's own flag: Relay refuses CUDA graphs by name
        "--parallelism.spmd_backend", "partial_dtensor",  # 0.3's default backend needs a newer torch than 2.13
        "--hf_assets_path", str(ASSETS / "tokenizer"), "--dataloader.dataset_path", str(ASSETS / "c4_test"),
        "--training.steps", "2", "--training.seq_len", str(SEQ), "--training.local_batch_size", str(BATCH),
        "--debug.seed", "0"]
STEP = re.compile(r"\[rank 0\] .*step:\s*(\d+)\s+loss:\s*([\d.]+)\s+grad_norm:\s*([\d.]+)\s+memory:\s*([\d.]+)GiB"
                  r".*tps: ([\d,]+)\s+tflops: ([\d.]+)\s+mfu: ([\d.]+)%")


def reference(tmp_path) -> tuple:
    """The two ranks of bench/titan_reference.py, started as torchrun would start them (it runs
    beside Relay's launch), on a rendezvous store and gloo sockets on loopback alone: torchrun's own
    store listens on every interface and unpickles what it reads. Run each time rather than kept:
    the last digits of its figures move with the host's CPU kernels (loss 8.05884 on one host,
    8.05887 on another), and Relay's with them."""
    fd = listening_fd("127.0.0.1", 0, 2)
    with socket.socket(fileno=os.dup(fd)) as s:
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 2, True, timedelta(seconds=300), wait_for_workers=False,
                          master_listen_fd=fd)
    runs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="1",
                   GLOO_SOCKET_IFNAME="lo")
        log = open(tmp_path / f"reference-{rank}.log", "w")
        runs.append(subprocess.Popen([sys.executable, str(ROOT / "bench" / "titan_reference.py"), *ARGS,
                                      "--dump_folder", str(tmp_path / "reference")], env=env, cwd=ROOT,
                                     stdout=log, stderr=subprocess.STDOUT))
    return store, runs


def steps_of(tmp_path, runs: list) -> list:
    """(step, loss, grad_norm) as torchtitan printed them in the reference's two ranks."""
    for run in runs:
        run.wait(timeout=300)
    out = re.sub(r"\x1b\[[0-9;]*m", "", "".join((tmp_path / f"reference-{r}.log").read_text() for r in range(2)))
    assert [run.returncode for run in runs] == [0, 0], out[-2000:]
    steps = {}  # (both ranks print each step's line, with the same figures)
    for s, loss, g in re.findall(r"step:\s*(\d+)\s+loss:\s*([\d.]+)\s+grad_norm:\s*([\d.]+)", out):
        steps.setdefault(int(s), (int(s), float(loss), float(g)))
    return [steps[k] for k in sorted(steps)]


def test_torchtitan_llama3_debug_model_under_fsdp_as_it_ships(ray_session, tmp_path, capsys):
    store, runs = reference(tmp_path)
    try:
        assert main(["launch", "--chip", "h100", "--devices", "2", "--out", str(tmp_path), "--name", "titan",
                     "-m", "torchtitan.train", *ARGS, "--dump_folder", str(tmp_path / "dump")]) == 0
        torchrun = steps_of(tmp_path, runs)
    finally:
        for run in runs:
            run.kill()
        del store
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    lines = [m.groups() for m in STEP.finditer(out)]
    # the losses and grad norms torchrun's run prints, at every step
    assert len(torchrun) == 2 and [(int(s), float(loss), float(g)) for s, loss, g, *_ in lines] == torchrun
    # the chip it sees and the MFU peak it takes from the chip's name: the emulated H100's
    assert "[rank 0] relay: init_process_group(backend='nccl') runs on the 'relay' backend" in out
    assert "CUDA capacity: H100" in out and "Peak FLOPS used for computing MFU: 9.890e+14" in out
    with open(tmp_path / "titan" / "steps.csv") as fh:
        step_s = {int(r["step"]): float(r["step_s"]) for r in csv.DictReader(fh) if r["device"] == "0"}
    _, _, _, memory, tps, tflops, mfu = lines[1]
    # its tps (tokens per device per second, from its own time.perf_counter) is the emulated step's:
    # step 2's line covers Relay's step 1 (Relay's step 0 is step 1 and the set-up)
    assert int(tps.replace(",", "")) == pytest.approx(SEQ * BATCH / step_s[1], rel=0.02)
    assert float(mfu) == pytest.approx(100 * float(tflops) * 1e12 / 989e12, abs=0.011)
    assert 0 < float(memory) < 1  # GiB of the emulated HBM (torchrun on the host prints -0.00)
