"""Print a folder holding `relay` laid out as an installed wheel lays it out (emulator/ as relay/,
kernels/ as relay/kernels/, launch/ as relay/launch/), made of links to the checkout: import-linter
walks a package's folder, so it finds relay.kernels and relay.launch only there. Rebuilt each call."""

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "lint"
MAPPED = {"kernels": ROOT / "kernels", "launch": ROOT / "launch"}  # relay.<name> -> folder (pyproject's package-dir)

shutil.rmtree(OUT, ignore_errors=True)
relay = OUT / "relay"
relay.mkdir(parents=True)
for entry in (ROOT / "emulator").iterdir():
    if entry.name in MAPPED:
        (relay / entry.name).mkdir()
        (relay / entry.name / "__init__.py").symlink_to(entry / "__init__.py")
        for module in MAPPED[entry.name].glob("*.py"):
            (relay / entry.name / module.name).symlink_to(module)
    elif entry.name != "__pycache__":
        (relay / entry.name).symlink_to(entry)
print(OUT)
