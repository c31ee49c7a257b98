"""Named crash points, so tests can SIGKILL a real run at an exact moment.

Inactive (one dict lookup) unless the environment variable ``TRAINKIT_KILL_AT`` is set to
``POINT:N``: the process then sends itself SIGKILL (or the signal named by
``TRAINKIT_KILL_SIGNAL``, e.g. ``TERM``) the N-th time it reaches ``POINT``.
Points: ``step`` (after an optimizer step), ``validation`` (after a validation batch),
``save:temp_written``, ``save:before_rename``, ``save:after_rename``, ``save:retention``.
Under torchrun every rank sees the same variables; ``TRAINKIT_KILL_RANK=R`` limits the kill
to the process whose ``RANK`` is R (the launcher then tears down the others).
A SIGKILL cannot be caught, so this exercises exactly what a preempted machine does.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_hits: Counter[str] = Counter()


def crash_point(name: str) -> None:
    spec = os.environ.get("TRAINKIT_KILL_AT")
    if not spec:
        return
    point, _, nth = spec.rpartition(":")
    if point != name:
        return
    only_rank = os.environ.get("TRAINKIT_KILL_RANK")
    if only_rank is not None and only_rank != os.environ.get("RANK", "0"):
        return
    _hits[name] += 1
    if _hits[name] == int(nth):
        signum = getattr(signal, "SIG" + os.environ.get("TRAINKIT_KILL_SIGNAL", "KILL"))
        os.kill(os.getpid(), signum)
