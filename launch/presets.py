"""Experiment presets: small TOML files of command-line options.

`relay run --preset NAME` (or sweep, breakeven) reads launch/presets/NAME.toml, or a .toml file
given by path: copy one to start your own. Keys are the long option names with dashes written
as underscores (`per_device_batch = 8`); options given on the command line win over the preset.
"""

from __future__ import annotations

from pathlib import Path

from relay.errors import ConfigError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

PRESETS = Path(__file__).with_name("presets")


def names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.toml"))


def load(name: str) -> dict:
    path = Path(name)
    if path.suffix != ".toml":
        path = PRESETS / f"{name}.toml"
        if not path.exists():
            raise ConfigError(f"preset = {name!r} is unknown; presets: {', '.join(names())} "
                             "(or give the path of a .toml file)")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as e:
        raise ConfigError(f"preset file {str(path)!r} cannot be read ({e.strerror}); check the path") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"preset file {str(path)!r} is not valid TOML ({e}); fix it or use another") from None


def apply(args, command: str, valid: set[str]) -> None:
    """Fill the options left unset on the command line from the preset named by args.preset."""
    if not getattr(args, "preset", None):
        return
    values = load(args.preset)
    cmd = values.pop("command", command)
    if cmd != command:
        raise ConfigError(f"preset {args.preset!r} is for `relay {cmd}`, not `relay {command}`")
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"preset {args.preset!r}: unknown option(s) {', '.join(unknown)}; "
                         f"`relay {command} --help` lists the options")
    for key, value in values.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
