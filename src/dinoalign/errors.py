"""Exception types shared across the package (kept import-light: no torch, no numpy)."""


class ConfigError(ValueError):
    """A params file, override or config value that does not fit the typed config."""
