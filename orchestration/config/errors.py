"""The error a configuration that cannot work raises: its message names the config key(s)."""


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the config key(s)."""
