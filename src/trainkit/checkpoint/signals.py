"""SIGTERM/SIGINT/SIGHUP at any moment of a training job: stop cleanly with status 75, never a bare 143.

Schedulers (Slurm, Kubernetes, a requeueing wrapper) send SIGTERM whenever they like and read
75 (EX_TEMPFAIL) as "requeue me". Inside the training loop a signal only sets a flag on the
Trainer, which finishes the step, saves a checkpoint and raises ``TrainingInterrupted``.
Anywhere else (start-up, data loading, test evaluation, export) the handler raises
``TrainingInterrupted`` at once: every file is written atomically, so stopping there loses
only time. Further signals while stopping are ignored with a message, so a second Ctrl-C
cannot cut a save short; SIGKILL is always safe (docs/reliability.md). SIGHUP (the terminal or
ssh session closed) is a stop like SIGTERM: without a handler it killed the job with no save.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from trainkit.errors import TrainingInterrupted

log = logging.getLogger("trainkit")

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped cleanly by a signal; a scheduler may requeue with --resume


class Interruptible(Protocol):
    def request_interrupt(self, reason: str) -> None: ...


class GracefulStop:
    """The job's signal handling; ``resumable`` says whether ``--resume`` can continue it yet."""

    def __init__(self) -> None:
        self.resumable = False
        self.received: str | None = None  # the first signal's name
        self._trainer: Interruptible | None = None

    def handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            log.warning("received %s again: already stopping, ignored (kill -9 stops at once; checkpoints "
                        "survive it)", name)  # fmt: skip
            return
        self.received = name
        if self._trainer is not None:
            self._trainer.request_interrupt(f"received {name}")
            return
        raise self.interrupted(f"received {name} outside the training loop")

    def interrupted(self, message: str) -> TrainingInterrupted:
        advice = "continue with --resume" if self.resumable else "nothing was saved yet; run the same command again"
        return TrainingInterrupted(message, advice=advice)

    @contextmanager
    def deferred_to(self, trainer: Interruptible) -> Iterator[None]:
        """While training: let ``trainer`` stop at the end of its step. A signal that came too
        late for the loop to act on (after its last check) stops the job right after it."""
        self._trainer = trainer
        try:
            yield
        finally:
            self._trainer = None
        if self.received is not None:
            raise self.interrupted(f"received {self.received} as training ended; the last checkpoint is saved")


_active: GracefulStop | None = None


@contextmanager
def graceful_stop() -> Iterator[GracefulStop]:
    """Install the handlers for the block (re-entrant: an inner block shares the outer's state).

    Outside the main thread signals cannot be handled by Python; the block then does nothing.
    """
    global _active
    if _active is not None or threading.current_thread() is not threading.main_thread():
        yield _active or GracefulStop()
        return
    guard = GracefulStop()
    previous = {sig: signal.signal(sig, guard.handle) for sig in STOP_SIGNALS}
    _active = guard
    try:
        yield guard
    finally:
        _active = None
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals() -> None:
    """For the last moments of the process (interpreter exit): the outcome is decided and printed."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
