"""Exception types shared across the package (kept import-light: no torch, no numpy)."""


class ConfigError(ValueError):
    """A params file, override or config value that does not fit the typed config."""


class InferenceError(ValueError):
    """A user-facing problem with a model, an image, a class list or an index (evaluation
    and the inference commands); the message says how to fix it."""


class PreprocessingMismatch(ValueError):
    """Features embedded with one image preprocessing (mean/std, interpolation, crop, size)
    about to be mixed with features made with another; the message names both."""


class DatasetError(InferenceError):
    """An evaluation-dataset file that cannot be used as it is (an unreadable image or
    label, label ids outside the class list, a malformed class-names or captions file);
    the message names the file and says how to fix it."""


class DatasetFileMissing(DatasetError, FileNotFoundError):
    """A file or folder the dataset's layout needs is not there."""
