"""`--workers K`: K trial processes on the one study, each with its share of the cores.

Each worker is a spawned process running the same claim-train-tell loop as a single tuner
(trainkit.tune.trials.work); the claim lock keeps them from taking the same trial. A stop signal to
the tuner is passed on, so every worker checkpoints its trial and stops (status 75); if the tuner
itself is killed, each worker notices within half a second and stops the same way.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time

import torch

from trainkit.errors import TrainingInterrupted, TrainkitError
from trainkit.exits import exit_status
from trainkit.checkpoint.signals import EXIT_INTERRUPTED, graceful_stop
from trainkit.tune.study import TuneSpec
from trainkit.tune.trials import RESUME_ADVICE, work

PARENT_CHECK_S = 0.5  # how often a worker checks that the tuner is still alive


def run_workers(spec: TuneSpec, count: int) -> None:
    """Run ``count`` worker processes to the end of the study; raises as the tuner would."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    devices = worker_devices(spec.base.get("device", "auto"), count)
    processes = [context.Process(target=worker_main, args=(spec, index, os.getpid(), devices[index]),
                                 name=f"trainkit-tune-{index}") for index in range(count)]  # fmt: skip
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.join()
    except TrainingInterrupted as exc:  # SIGTERM/SIGINT reached the tuner: every worker saves and stops
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for process in processes:
            if process.pid is not None:
                process.join()
        raise TrainingInterrupted(f"{exc}; each worker checkpointed its trial", advice=RESUME_ADVICE) from None
    codes = [process.exitcode for process in processes]
    if EXIT_INTERRUPTED in codes:
        raise TrainingInterrupted("a worker was stopped by a signal; its trial is checkpointed", advice=RESUME_ADVICE)
    failed = [f"worker {index} ({describe_exit(code)})" for index, code in enumerate(codes) if code]
    if failed:
        raise TrainkitError(f"{', '.join(failed)} failed (the error is above); fix it, then {RESUME_ADVICE}")


def worker_devices(device: str, count: int) -> list[str | None]:
    """Each worker's --device: with ``auto``/``cuda`` and several visible GPUs, worker i trains on
    ``cuda:(i mod GPUs)``; otherwise every worker keeps the study's setting (None)."""
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    return [f"cuda:{index % gpus}" if gpus > 1 else None for index in range(count)]


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def worker_main(spec: TuneSpec, index: int, parent: int, device: str | None = None) -> None:
    """A worker process: stop with the tuner, log with a prefix, report errors as the CLI does."""
    stop_with_parent(parent)
    logging.basicConfig(level=logging.INFO, format=f"[worker {index}] %(message)s", stream=sys.stderr)
    sys.exit(exit_status(f"trainkit tune (worker {index})", lambda: guarded_work(spec, device)))


def guarded_work(spec: TuneSpec, device: str | None) -> int:
    with graceful_stop():
        work(spec, device=device)
    return 0


def stop_with_parent(parent: int) -> None:
    """One SIGTERM to this worker when the tuner is gone, however it died: a daemon thread watches
    for the parent to change. (Linux's PR_SET_PDEATHSIG fires once per exiting thread of the
    parent, so a tuner with torch's thread pool sent it several.)"""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="trainkit-tune-watch-parent", daemon=True).start()
