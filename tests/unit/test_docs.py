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


def test_the_repo_docs_stand_alone():
    # the design notes, README and catalog cite only the repo and public sources, never the
    # project's working notes outside the repo (shared/DESIGN.md, SPECS.md)
    texts = [p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
                                     ROOT / "emulator" / "chips" / "catalog.toml"]]
    for text in texts:
        for outside in ("shared/", "SPECS.md", "DESIGN.md"):
            assert outside not in text, outside


def test_the_tree_docs_do_not_claim_nccl_s_leaf_property():
    # the tree is two mirrored heap trees (tests/unit/test_schedules.py); a rank can be a leaf of
    # both, so the docs must not say that the leaves of one tree are inner nodes of the other
    design = (ROOT / "docs" / "design.md").read_text()
    tree = design.split("**tree**", 1)[1].split("- **", 1)[0]
    assert "leaf of both" in tree and "double binary tree, where" not in tree


def test_the_demo_duration_is_stated_once_the_same_way():
    # README, the demo preset and the CLI's help give the same (measured) duration
    said = "about 6 minutes on 2 cores"
    assert said in (ROOT / "README.md").read_text()
    assert said in (ROOT / "launch" / "presets" / "demo.toml").read_text().lower()
    assert said in (ROOT / "launch" / "cli.py").read_text()
