"""Exception types shared across the package (kept import-light: no torch, no numpy)."""


class ConfigError(ValueError):
    """A params file, override or config value that does not fit the typed config."""


class InferenceError(ValueError):
    """A user-facing problem with a model, an image, a class list or an index (evaluation
    and the inference commands); the message says how to fix it."""
