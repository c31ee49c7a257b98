"""A status probe against a starting run: one process polls is_locked (what `trainkit runs` does)
in a tight loop, another takes and releases the run folder's lock ATTEMPTS times; prints how many
lock attempts were refused (docs/benchmarks.md, "Reliability, round three").

    python benchmarks/lock_contention.py FOLDER [ATTEMPTS]
"""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path
from typing import Any

from trainkit.checkpoint.rundir import RunFolderBusy, is_locked, lock_run_folder, release_run_folder


def poll(folder: Path, stop: Any) -> None:
    while not stop.is_set():
        is_locked(folder)


def main() -> None:
    folder, attempts = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    lock_run_folder(folder)
    release_run_folder(folder)
    stop = multiprocessing.Event()
    poller = multiprocessing.Process(target=poll, args=(folder, stop))
    poller.start()
    refused = 0
    for _ in range(attempts):
        try:
            lock_run_folder(folder)
        except RunFolderBusy:
            refused += 1
            continue
        release_run_folder(folder)
    stop.set()
    poller.join()
    print(f"{refused} of {attempts} lock attempts refused")


if __name__ == "__main__":
    main()
