"""Relay installs under one import namespace, `relay`: no generic top-level `kernels` or `launch`
shadows another package's (transformers 5 imports Hugging Face's `kernels`)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_transformers_gpt2_and_relay_import_together_from_the_repository_root():
    code = ("from transformers import GPT2Config, GPT2LMHeadModel\n"
            "import relay, relay.kernels.cost, relay.launch.cli\n"
            "import kernels\n"
            "model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=8))\n"
            "print(relay.Cluster.__module__, relay.kernels.cost.CostModel.__module__, kernels.__file__,\n"
            "      sum(p.numel() for p in model.parameters()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    cluster, cost, hf_kernels, params = out.stdout.split()
    assert (cluster, cost) == ("relay.driver.cluster", "relay.kernels.cost")
    assert Path(hf_kernels).resolve().parent != (ROOT / "kernels").resolve()  # Hugging Face's, not the repo's
    assert "site-packages" in Path(hf_kernels).parts
    assert int(params) > 0


def test_the_repository_folders_are_not_top_level_packages():
    """kernels/ and launch/ hold relay.kernels' and relay.launch's modules but are no packages of
    their own; outside the repository none of the three folder names imports."""
    assert not (ROOT / "kernels" / "__init__.py").exists() and not (ROOT / "launch" / "__init__.py").exists()
    code = "import importlib.util as u; print(u.find_spec('emulator'), u.find_spec('launch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert out.stdout.split() == ["None", "None"], out.stdout + out.stderr
