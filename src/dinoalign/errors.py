"""Exception types shared across the package (kept import-light: no torch, no numpy).

Every problem a user can fix (a bad param, a missing or invalid input, an earlier stage's
output that is not there, a bad model folder, image or class list, a device or program this
machine lacks, a stack that cannot start) raises a :class:`UserError` subclass whose message
says how to fix it. ``dinoalign.cli.main`` is the only place that catches them: it prints
``dinoalign <command>: <message>`` on one line and exits with ``exit_code`` (2 unless a
command documents another). So does an ``OSError`` that says the disk is full (no space,
over quota, past the file-size limit: :func:`dinoalign.storage.disk_full`), from wherever
it comes. Anything else is a bug and ends with its traceback.

    UserError
    ├── ConfigError (ValueError)              params, overrides, settings that cannot run here
    ├── DataError (ValueError)                missing/invalid pipeline inputs
    │   └── DataFileMissing (FileNotFoundError)   e.g. "run the embed stage first"
    ├── InferenceError (ValueError)           model, image, class list, index
    │   └── DatasetError                      an evaluation-dataset file
    │       └── DatasetFileMissing (FileNotFoundError)
    ├── PreprocessingMismatch (ValueError)
    ├── SetupError (RuntimeError)             something this machine lacks
    │   └── StackError                        ``dinoalign infra``
    ├── DvcError (RuntimeError)
    └── RetrainError (RuntimeError)           ``dinoalign retrain``: exit 1 (failed) or 75 (locked)
"""


class UserError(Exception):
    """A problem the user can fix; the message says how. ``exit_code`` is what the
    ``dinoalign`` command returns for it."""

    exit_code: int = 2


class ConfigError(UserError, ValueError):
    """A params file, override or config value that does not fit the typed config."""


class DataError(UserError, ValueError):
    """A pipeline input that is missing or cannot be used as it is (an earlier stage's
    output, the pairs, the features, the curated list, new data); the message names it
    and says which stage or setting makes it."""


class DataFileMissing(DataError, FileNotFoundError):
    """A file or folder an earlier stage (or the user) should have made is not there."""


class InferenceError(UserError, ValueError):
    """A user-facing problem with a model, an image, a class list or an index (evaluation
    and the inference commands); the message says how to fix it."""


class PreprocessingMismatch(UserError, ValueError):
    """Features embedded with one image preprocessing (mean/std, interpolation, crop, size)
    about to be mixed with features made with another; the message names both."""


class DatasetError(InferenceError):
    """An evaluation-dataset file that cannot be used as it is (an unreadable image or
    label, label ids outside the class list, a malformed class-names or captions file);
    the message names the file and says how to fix it."""


class DatasetFileMissing(DatasetError, FileNotFoundError):
    """A file or folder the dataset's layout needs is not there."""


class SetupError(UserError, RuntimeError):
    """This machine lacks something the command needs (a CUDA device, network access for
    weights, a program or package); the message says what to install or set."""


class StackError(SetupError):
    """The stack cannot be started, found or stopped as asked."""


class DvcError(UserError, RuntimeError):
    """A DVC command failed; the message names the command and DVC's own error lines."""


class RetrainError(UserError, RuntimeError):
    """Retraining stopped; ``exit_code`` is what ``dinoalign retrain`` returns
    (docs/operations.md: 1 failed with every champion untouched, 75 another run holds the
    lock, so cron can tell "try again later" from "look at the log")."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
