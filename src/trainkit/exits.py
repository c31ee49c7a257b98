"""What a trainkit command exits with: each user problem is one line on stderr and a status a
script or scheduler can act on (a traceback means a trainkit bug). Used by the CLI and by each
``trainkit tune --workers`` process."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from trainkit.errors import NonFiniteLossError, TrainingInterrupted, TrainkitError
from trainkit.checkpoint.signals import EXIT_INTERRUPTED

EXIT_USAGE = 2  # a user error: bad flag, missing/corrupt data or checkpoint
EXIT_NONFINITE = 3  # the loss became NaN/inf and the --on-nonfinite policy gave up
EXIT_UNVERIFIED = 1  # trainkit inspect: the checkpoint fails verification


def exit_status(prog: str, command: Callable[[], int]) -> int:
    """Run a command; a user's problem becomes one line on stderr and its exit status."""
    try:
        return command()
    except TrainingInterrupted as exc:
        print(f"{prog}: {exc}; {exc.advice}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteLossError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    except TrainkitError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `trainkit inspect X | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # the machine, not trainkit: disk full, permissions, a vanished folder
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print(f"{prog}: error: out of memory; use a smaller model or --batch-size", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; earlier checkpoints are intact", file=sys.stderr)
        return 130
