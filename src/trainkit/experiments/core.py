"""The machinery every comparison shares: cells, the per-cell cache, tables and plots.

A comparison is a list of *cells* (one training run each). Each finished cell's result is
cached as ``cells/<key>.json`` in the output dir together with the config that produced it,
so an interrupted comparison re-run skips what is done, and a changed config re-runs.
Every comparison writes ``results.csv`` (one row per cell), ``report.md`` and PNG plots.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainkit.config.schema import TrainConfig
from trainkit.tracking.plots import plt
from trainkit.checkpoint.rundir import write_atomically
from trainkit.recipes.run import train_run

log = logging.getLogger("trainkit")

@dataclass(frozen=True)
class Cell:
    key: str  # unique, file-name safe
    group: str  # what the table aggregates over seeds
    config: TrainConfig


def run_cells(cells: Sequence[Cell], out_dir: Path, run: Callable[[Cell], dict[str, Any]]) -> list[dict[str, Any]]:
    """Run each cell unless a cached result for the same config exists; returns the results in order."""
    cache = out_dir / "cells"
    cache.mkdir(parents=True, exist_ok=True)
    results = []
    for index, cell in enumerate(cells, start=1):
        path = cache / f"{cell.key}.json"
        cached = json.loads(path.read_text()) if path.is_file() else None
        if cached is not None and cached["config"] == cell.config.to_dict():
            log.info("[%d/%d] %s: cached", index, len(cells), cell.key)
            results.append(cached)
            continue
        log.info("[%d/%d] %s: running", index, len(cells), cell.key)
        result = {"key": cell.key, "group": cell.group, "config": cell.config.to_dict(), **run(cell)}
        write_atomically(path, json.dumps(result, indent=2) + "\n")
        results.append(result)
    return results


def train_cell(cell: Cell, out_dir: Path) -> dict[str, Any]:
    """One training run; its output dir is replaced if an earlier attempt died half-way."""
    run_dir = out_dir / "runs" / cell.key
    if run_dir.exists():
        shutil.rmtree(run_dir)
    summary = train_run(dataclasses.replace(cell.config, out=str(run_dir)))
    return {"summary": summary, "history": read_history(run_dir / "history.csv")}


def read_history(path: Path) -> list[dict[str, float]]:
    with path.open() as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def mean_std(values: Sequence[float], value_format: str = ".4f", spread_format: str = ".4f") -> str:
    """'mean ± sample std' over seeds ('–' for none, the value alone for one)."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:{value_format}}"
    return f"{statistics.mean(values):{value_format}} ± {statistics.stdev(values):{spread_format}}"


def finish_plot(fig: Any, ax: Any, path: Path, *, xlabel: str, ylabel: str) -> None:
    """Label, legend, grid and save a one-axes figure, then free it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def summary_table(rows: list[dict[str, Any]], group_key: str, columns: Sequence[str]) -> str:
    """A markdown table: one line per group, each column as mean ± std over the group's rows."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row[group_key], []).append(row)
    lines = [f"| {group_key} | runs | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for group, members in groups.items():
        cells = []
        for column in columns:
            values = [float(m[column]) for m in members if m[column] != ""]
            missing = len(members) - len(values)
            cells.append(mean_std(values) + (f" ({missing} never)" if missing else ""))
        lines.append(f"| {group} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_val_accuracy(results: list[dict[str, Any]], path: Path) -> None:
    """Validation accuracy per epoch, mean over seeds, one line per group."""
    by_group: dict[str, list[list[float]]] = {}
    for result in results:
        by_group.setdefault(result["group"], []).append([row["val_accuracy"] for row in result["history"]])
    fig, ax = plt.subplots(figsize=(7, 4))
    for group, curves in by_group.items():
        length = min(len(curve) for curve in curves)
        mean = [statistics.mean(curve[i] for curve in curves) for i in range(length)]
        ax.plot(range(1, length + 1), mean, marker="o", markersize=3, label=group)
    finish_plot(fig, ax, path, xlabel="epoch", ylabel="validation accuracy (mean over seeds)")
