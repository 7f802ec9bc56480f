"""The README's examples are the files the tests run, so the documentation cannot rot."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_plug_in_example_is_examples_custom_model():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Plug in your own model", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    source = (ROOT / "examples" / "custom_model.py").read_text()
    code = source[source.index("import torch"):]
    assert block.strip() == code.strip()


def test_readme_gives_the_two_setup_commands_and_ci_uses_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_torch_distributed_example_is_examples_torch_ddp():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run your own torch.distributed script", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    source = (ROOT / "examples" / "torch_ddp.py").read_text()
    assert block.strip() == source[source.index("import torch"):].strip()
    assert "relay launch --chip h100 --devices 4 --domain 2 examples/torch_ddp.py" in section
