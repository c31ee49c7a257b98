"""Named crash points, so tests can SIGKILL a real run at an exact moment.

Inactive (one dict lookup) unless the environment variable ``TRAINKIT_KILL_AT`` is set to
``POINT:N`` (or several, comma separated): the process then sends itself SIGKILL (or the
signal named by ``TRAINKIT_KILL_SIGNAL``, e.g. ``TERM``) the N-th time it reaches ``POINT``.
Points: ``launch`` (the command starts, before the heavy imports), ``start`` (the train job
starts, before data loading), ``step`` (after an optimizer step), ``validation`` (after a
validation batch), ``save:temp_written``, ``save:before_rename``, ``save:after_rename``,
``save:retention``, ``export`` (before the final files are written).
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
    wanted = [int(nth) for point, _, nth in (item.rpartition(":") for item in spec.split(",")) if point == name]
    if not wanted:
        return
    only_rank = os.environ.get("TRAINKIT_KILL_RANK")
    if only_rank is not None and only_rank != os.environ.get("RANK", "0"):
        return
    _hits[name] += 1
    if _hits[name] in wanted:
        signum = getattr(signal, "SIG" + os.environ.get("TRAINKIT_KILL_SIGNAL", "KILL"))
        os.kill(os.getpid(), signum)
