"""The error type for bad input. It imports nothing, so that every layer (kernels, chips, systems,
collectives, experiments, the command line) can raise it.

`relay` reports a ConfigError as one line and exit status 2: the message names the field, the
value and the fix. Any other exception is a bug or a failure of the environment, and shows its
traceback."""


class ConfigError(ValueError):
    """Bad input: a field, its value, and how to fix it. A ValueError, so callers that catch
    ValueError keep working."""
