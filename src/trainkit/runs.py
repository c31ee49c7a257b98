"""`trainkit runs [DIR]`: the runs under a folder, one row each, so a person finds the one they want.

A run is a folder holding ``config.json``. Its status comes from its files and its lock:
``running`` (a live process holds ``OUT/.lock``), ``finished`` (``summary.json``), ``failed``
(``failure.json``, written when a run ends on an error) or ``interrupted`` (stopped or killed:
``trainkit train --out DIR --resume`` continues it). The settings column lists only what
differs between the runs listed.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainkit.errors import ConfigError
from trainkit.rundir import is_locked, read_json

FAILURE_FILE = "failure.json"
MAX_DEPTH = 4  # run folders are looked for this deep under DIR
UNCOMPARED = ("out", "data_dir", "data_file", "device", "plots")  # where it ran, not what it trained


@dataclass
class RunInfo:
    path: Path
    status: str
    config: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)
    failure: str = ""


def find_runs(root: Path) -> list[Path]:
    """Run folders under ``root`` (itself included), in name order; a one-line error when there are none."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder; give the folder your runs are in (e.g. runs/)")
    found = []
    for folder, subfolders, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        if "config.json" in files:
            found.append(Path(folder))
            subfolders.clear()  # a run's own subfolders (checkpoints/, tensorboard/) hold no runs
        elif depth >= MAX_DEPTH:
            subfolders.clear()
        subfolders.sort()
    return found


def read_run(folder: Path) -> RunInfo:
    config = read_json(folder / "config.json", "the run's settings")
    summary = read_json(folder / "summary.json", "the run's summary") if (folder / "summary.json").is_file() else {}
    failure = read_json(folder / FAILURE_FILE, "the run's failure note") if (folder / FAILURE_FILE).is_file() else {}
    if is_locked(folder):
        status = "running"
    elif summary:
        status = "finished"
    elif failure:
        status = "failed"
    else:
        status = "interrupted"
    history_path = folder / "history.csv"
    history = read_history(history_path) if history_path.is_file() else []
    return RunInfo(folder, status, config, summary, history, failure.get("error", ""))


def read_history(path: Path) -> list[dict[str, str]]:
    """history.csv's rows; every cell must be a number or empty (a damaged file is one line naming it)."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        for row in rows:
            for value in row.values():
                if value not in ("", None):
                    float(value)
    except (csv.Error, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the run's history {path} is damaged ({exc}); restore it or leave that run out") from None
    return rows


def differing_settings(runs: list[RunInfo]) -> list[str]:
    """Config keys whose values are not the same in every run (where it ran excluded)."""
    keys = sorted({key for run in runs for key in run.config} - set(UNCOMPARED))
    return [key for key in keys if len({repr(run.config.get(key)) for run in runs}) > 1]


def best_metric(run: RunInfo) -> str:
    monitor = run.summary.get("monitor") or run.config.get("monitor", "val_loss")
    if run.summary.get("best_val_metric") is not None:
        return f"{monitor} {run.summary['best_val_metric']:.4g} (epoch {run.summary['best_epoch']})"
    values = [float(row[monitor]) for row in run.history if row.get(monitor) not in (None, "")]
    if not values:
        return "–"
    best = min(values) if "loss" in monitor else max(values)
    return f"{monitor} {best:.4g}"


def test_metric(run: RunInfo) -> str:
    tests = {k: v for k, v in run.summary.items() if k.startswith("test_") and isinstance(v, float)}
    if not tests:
        return "–"
    key = next((k for k in tests if not k.endswith("loss")), next(iter(tests)))
    return f"{key.removeprefix('test_')} {tests[key]:.4g}"


def runs_table(root: Path) -> str:
    """The markdown table `trainkit runs` prints."""
    runs = [read_run(folder) for folder in find_runs(root)]
    if not runs:
        raise ConfigError(f"no trainkit runs under {root} (a run folder holds config.json); check the folder")
    settings = differing_settings(runs)
    lines = ["| run | status | epochs | best | test | wall s | settings that differ |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        name = run.path.relative_to(root).as_posix() if run.path != Path(root) else run.path.name
        wall = run.summary.get("wall_seconds")
        status = run.status + (f": {run.failure}" if run.failure and run.status == "failed" else "")
        differing = ", ".join(f"{key}={run.config.get(key)}" for key in settings) or "–"
        lines.append(f"| {name} | {status} | {len(run.history)} | {best_metric(run)} | {test_metric(run)} | "
                     f"{'–' if wall is None else f'{wall:.1f}'} | {differing} |")  # fmt: skip
    return "\n".join(lines)
