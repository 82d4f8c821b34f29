"""The model package's error types (one home, imported by config and release_config)."""


class ConfigError(ValueError):
    """A config key is unknown, mistyped or inconsistent; the message names the key."""
