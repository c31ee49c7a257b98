"""User-facing errors.

Every problem a user can fix (a wrong path, a corrupt file, a nonsense hyper-parameter)
is raised as a ``TrainkitError`` whose message names the problem and the fix. The CLI
prints these as one line and exits non-zero instead of showing a traceback.
"""


class TrainkitError(Exception):
    """Base class for errors that a user can act on."""


class ConfigError(TrainkitError, ValueError):
    """A hyper-parameter or flag has an invalid value."""


class DataError(TrainkitError):
    """Data files are missing, corrupt or inconsistent."""


class CheckpointError(TrainkitError):
    """A checkpoint is missing, corrupt or incompatible."""


class NonFiniteLossError(TrainkitError):
    """The loss became NaN or infinite during training."""


class TrainingInterrupted(TrainkitError):
    """SIGTERM/SIGINT arrived: training saved a checkpoint and stopped cleanly."""

    def __init__(self, message: str, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
