"""User-facing errors.

Every problem a user can fix (a wrong path, a corrupt file, a nonsense hyper-parameter)
is raised as a ``TrainkitError`` whose message names the problem and the fix. The CLI
prints these as one line and exits non-zero instead of showing a traceback.
"""


def first_line(exc: BaseException) -> str:
    """An exception's first line (its type's name when it has no message), for one-line errors that
    quote a library's own."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class TrainkitError(Exception):
    """Base class for errors that a user can act on."""


class ConfigError(TrainkitError, ValueError):
    """A hyper-parameter or flag has an invalid value."""


class DataError(TrainkitError):
    """Data files are missing, corrupt or inconsistent."""


class CheckpointError(TrainkitError):
    """A checkpoint is missing, corrupt or incompatible."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint fails its own integrity check: its bytes are damaged, or it is not a trainkit
    checkpoint. The only kind of file resume ever sets aside; a file that cannot be read right now
    (permissions, EIO, out of memory) or does not fit the model is refused and left as it is."""


class OutputError(TrainkitError):
    """A result file (exported weights, summary) could not be written: disk full, permissions."""


class NonFiniteLossError(TrainkitError):
    """The loss became NaN or infinite during training."""


class TrainingInterrupted(BaseException):
    """SIGTERM/SIGINT arrived: the job stopped cleanly (after saving, inside the training loop).

    A BaseException, like KeyboardInterrupt: a stop signal raised at an arbitrary point of the
    job must not be swallowed by an ``except Exception`` on its way to the exit code (75).
    ``advice`` is what to do next, printed after the message.
    """

    def __init__(self, message: str, checkpoint: str | None = None, advice: str = "continue with --resume") -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.advice = advice
