"""The ``trainkit`` command's first lines, before any heavy import.

Importing torch takes seconds; a SIGTERM in that time must also end in a clean stop with
status 75 and a message, not a bare 143. So the stop-signal handlers (trainkit.signals, which
imports only the standard library) are installed first, then the CLI is imported and run.
At the end stop signals are ignored: the outcome is decided and printed, and a scheduler
must see it, not a 143 from a signal that arrived while the interpreter shut down.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from trainkit.errors import TrainingInterrupted
from trainkit.faults import crash_point
from trainkit.signals import EXIT_INTERRUPTED, graceful_stop, ignore_stop_signals


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
    sys.exit(status)
