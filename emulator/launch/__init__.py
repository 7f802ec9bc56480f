"""`relay.launch`: the `relay` command line (one module per verb). Its modules live in the
repository's launch/ folder: an installed wheel maps them there (pyproject's package-dir); an
editable install (`make venv`) finds them through this package's path."""

from pathlib import Path

__path__.append(str(Path(__file__).resolve().parents[2] / "launch"))
