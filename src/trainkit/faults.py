"""Named crash points, so tests can SIGKILL a real run at an exact moment.

Inactive (one dict lookup) unless the environment variable ``TRAINKIT_KILL_AT`` is set to
``POINT:N``: the process then sends itself SIGKILL (or the signal named by
``TRAINKIT_KILL_SIGNAL``, e.g. ``TERM``) the N-th time it reaches ``POINT``.
Points: ``step`` (after an optimizer step), ``validation`` (after a validation batch),
``save:temp_written``, ``save:before_rename``, ``save:after_rename``, ``save:retention``.
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
    _hits[name] += 1
    if _hits[name] == int(nth):
        signum = getattr(signal, "SIG" + os.environ.get("TRAINKIT_KILL_SIGNAL", "KILL"))
        os.kill(os.getpid(), signum)
