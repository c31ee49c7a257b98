"""`trainkit runs [DIR]`: the runs under a folder, one row each, so a person finds the one they want.

A run is a folder holding ``config.json``. Its status comes from its files and its lock:
``running`` (a live process holds ``OUT/.lock``), ``finished`` (``summary.json``), ``failed``
(``failure.json``, written when a run ends on an error) or ``interrupted`` (stopped or killed:
``trainkit train --out DIR --resume`` continues it). The settings column lists only what
differs between the runs listed. A run whose files are damaged is left out with a one-line
warning naming it: one cut-off history.csv must not hide every other run.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from trainkit.errors import ConfigError
from trainkit.checkpoint.rundir import is_locked, read_json

log = logging.getLogger("trainkit")

FAILURE_FILE = "failure.json"
MAX_DEPTH = 4  # run folders are looked for this deep under DIR
UNCOMPARED = ("out", "data_dir", "data_file", "device", "plots")  # where it ran, not what it trained
# Written as escapes in a table cell: control characters (a newline would split the row), Unicode line
# separators and direction overrides (they reorder what follows), lone surrogates (undecodable bytes).
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


@dataclass
class History:
    """history.csv by column, one float per cell (NaN where empty): 8 bytes a cell instead of a dict
    of strings per row, so `runs` and `report` stay small on a 200,000-row history."""

    columns: dict[str, np.ndarray] = field(default_factory=dict)
    rows: int = 0

    def __len__(self) -> int:
        return self.rows

    def measured(self, column: str) -> np.ndarray:
        """The column's values, NaN where nothing was measured (all NaN for a column the run lacks)."""
        return self.columns.get(column, np.full(self.rows, math.nan))

    @cached_property
    def positions(self) -> np.ndarray:
        """Each row's x: its optimizer step, else its epoch, else its row number (from 1)."""
        x = np.arange(1, self.rows + 1, dtype=float)
        for name in ("epoch", "step"):  # the step wins where both are there
            x = np.where(np.isnan(self.measured(name)), x, self.measured(name))
        return x

    def points(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the rows where ``column`` holds a number."""
        y = self.measured(column)
        kept = ~np.isnan(y)
        return self.positions[kept], y[kept]


@dataclass
class RunInfo:
    path: Path
    status: str
    config: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    history: History = field(default_factory=History)
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
    history = read_history(history_path) if history_path.is_file() else History()
    return RunInfo(folder, status, config, summary, history, failure.get("error", ""))


def read_runs(folders: Iterable[Path]) -> list[RunInfo]:
    """The runs in ``folders``; a damaged one is left out with a one-line warning naming it. When
    none is readable, the first one's damage is the error."""
    runs, damaged = [], []
    for folder in folders:
        try:
            runs.append(read_run(folder))
        except ConfigError as exc:
            damaged.append(exc)
    if damaged and not runs:
        raise damaged[0]
    for exc in damaged:
        log.warning("left out a run: %s", exc)
    return runs


def read_history(path: Path) -> History:
    """history.csv, read a row at a time; every cell must be a number or empty (a damaged file is
    one line naming it)."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            cells = [array("d") for _ in header]
            for row in filter(None, reader):  # blank lines are no rows
                try:
                    append_row(cells, row)
                except ValueError as exc:
                    raise ValueError(f"line {reader.line_num}: {exc}") from None
    except (csv.Error, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the run's history {path} is damaged ({exc}); restore it or leave that run out") from None
    columns = {name: np.frombuffer(values, dtype=float) for name, values in zip(header, cells)}
    return History(columns, len(cells[0]) if cells else 0)


def append_row(cells: list[array], row: list[str]) -> None:
    """One history row onto its columns: a number each, NaN for an empty or missing cell."""
    if len(row) > len(cells):
        raise ValueError(f"{len(row)} cells for {len(cells)} columns")
    for column, value in zip(cells, row + [""] * (len(cells) - len(row))):
        column.append(float(value) if value.strip() else math.nan)


def differing_settings(runs: list[RunInfo]) -> list[str]:
    """Config keys whose values are not the same in every run (where it ran excluded)."""
    keys = sorted({key for run in runs for key in run.config} - set(UNCOMPARED))
    return [key for key in keys if len({repr(run.config.get(key)) for run in runs}) > 1]


def best_metric(run: RunInfo) -> str:
    monitor = run.summary.get("monitor") or run.config.get("monitor", "val_loss")
    if run.summary.get("best_val_metric") is not None:
        return f"{monitor} {run.summary['best_val_metric']:.4g} (epoch {run.summary['best_epoch']})"
    values = run.history.points(monitor)[1]
    if not len(values):
        return "–"
    best = values.min() if "loss" in monitor else values.max()
    return f"{monitor} {best:.4g}"


def test_metric(run: RunInfo) -> str:
    tests = {k: v for k, v in run.summary.items() if k.startswith("test_") and isinstance(v, float)}
    if not tests:
        return "–"
    key = next((k for k in tests if not k.endswith("loss")), next(iter(tests)))
    return f"{key.removeprefix('test_')} {tests[key]:.4g}"


def table_cell(value: object) -> str:
    """``value`` as one cell of a one-line row: unprintable characters (a newline in a folder name)
    written as escapes and ``|`` escaped, so no name can split a row or add a column."""
    text = _UNPRINTABLE.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), str(value))
    return text.replace("|", "\\|")


def runs_table(root: Path) -> str:
    """The markdown table `trainkit runs` prints."""
    runs = read_runs(find_runs(root))
    if not runs:
        raise ConfigError(f"no trainkit runs under {root} (a run folder holds config.json); check the folder")
    settings = differing_settings(runs)
    lines = ["| run | status | epochs | best | test | wall s | settings that differ |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        name = run.path.relative_to(root).as_posix() if run.path != Path(root) else run.path.name
        wall = run.summary.get("wall_seconds")
        status = run.status + (f": {run.failure}" if run.failure and run.status == "failed" else "")
        differing = ", ".join(f"{key}={run.config.get(key)}" for key in settings) or "–"
        cells = [name, status, len(run.history), best_metric(run), test_metric(run),
                 "–" if wall is None else f"{wall:.1f}", differing]  # fmt: skip
        lines.append("| " + " | ".join(map(table_cell, cells)) + " |")
    return "\n".join(lines)
