"""Published comparisons of full systems (launch/published.toml), keyed by (fast, slow) preset."""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

TABLE = Path(__file__).with_name("published.toml")


def comparisons() -> list[dict]:
    with open(TABLE, "rb") as fh:
        return tomllib.load(fh).get("comparison", [])


def comparison(fast: str, slow: str) -> dict | None:
    """The published comparison of exactly this pair of system presets, or None."""
    return next((c for c in comparisons() if (c["fast"], c["slow"]) == (fast, slow)), None)


def mfus() -> list[dict]:
    """Published training MFUs (the [[mfu]] rows of published.toml)."""
    with open(TABLE, "rb") as fh:
        return tomllib.load(fh).get("mfu", [])
