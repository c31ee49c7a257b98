"""The ``trainkit`` command's first lines, before any heavy import.

Importing torch takes seconds; a SIGTERM in that time must also end in a clean stop with
status 75 and a message, not a bare 143. So the stop-signal handlers (trainkit.checkpoint.signals, which
imports only the standard library) are installed first, then the CLI is imported and run.
At the end stop signals are ignored: the outcome is decided and printed, and a scheduler
must see it, not a 143 from a signal that arrived while the interpreter shut down.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn

from trainkit.errors import TrainingInterrupted
from trainkit.faults import crash_point
from trainkit.checkpoint.signals import EXIT_INTERRUPTED, graceful_stop, ignore_stop_signals


def entry_point() -> NoReturn:
    with graceful_stop():
        try:
            crash_point("launch")
            from trainkit.cli import main

            status = main()
        except TrainingInterrupted as exc:  # arrived while importing, before main() could catch it
            print(f"trainkit: {exc}; {exc.advice}", file=sys.stderr)
            status = EXIT_INTERRUPTED
    ignore_stop_signals()
    exit_without_teardown(status)


def exit_without_teardown(status: int) -> NoReturn:
    """Leave without the interpreter's module teardown, which takes ~1 s once the first optimizer
    step has imported torch._dynamo (docs/benchmarks.md, "Recipes"). Every output is written and
    synced by now; the exit handlers (logging's flush, multiprocessing's worker cleanup) still run."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status if isinstance(status, int) else 1)
