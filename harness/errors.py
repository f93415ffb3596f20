"""Errors the harness reports as one clear line (what was given, what was expected, where)."""


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any model is loaded."""


class RunFailed(RuntimeError):
    """A run that finished without one usable sample (every sample failed, for one common reason)."""
