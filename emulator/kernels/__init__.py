"""`relay.kernels`: what one emulated device's compute costs (per-op cost model, clocks, throttle,
host calibration). Its modules live in the repository's kernels/ folder: an installed wheel maps
them there (pyproject's package-dir); an editable install (`make venv`) finds them through this
package's path, so no top-level `kernels` is ever importable (Hugging Face's `kernels` package
owns that name)."""

from pathlib import Path

__path__.append(str(Path(__file__).resolve().parents[2] / "kernels"))
