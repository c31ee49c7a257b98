"""Comparisons a person can run and look at: a grid of training runs, a table, plots.

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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainkit.config import TrainConfig  # noqa: E402
from trainkit.run import train_run, write_atomically  # noqa: E402
from trainkit.schedules import lr_curve  # noqa: E402
from trainkit.trainer import schedule_spec  # noqa: E402

log = logging.getLogger("trainkit")

COMPARED_SCHEDULES = ("constant", "step", "cosine", "warmup_cosine", "onecycle")


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


def mean_std(values: Sequence[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


# --------------------------------------------------------------- schedules
def schedule_cells(base: TrainConfig, seeds: Sequence[int]) -> list[Cell]:
    return [
        Cell(
            key=f"{name}-seed{seed}",
            group=name,
            config=dataclasses.replace(base, schedule=name, seed=seed, warmup=None),  # each schedule's own warmup
        )
        for name in COMPARED_SCHEDULES
        for seed in seeds
    ]


def schedule_base_config(*, quick: bool, data_dir: str | None, dataset: str, model: str) -> TrainConfig:
    """The same model and budget for every schedule; no early stopping, so budgets are equal."""
    if quick:
        return TrainConfig(dataset="synthetic", model="mlp", hidden=[64], epochs=2, batch_size=128,
                           patience=0, device="cpu", val_size=500).resolved()  # fmt: skip
    return TrainConfig(dataset=dataset, data_dir=data_dir, model=model, epochs=10, patience=0).resolved()


def compare_schedules(
    out_dir: str | Path,
    *,
    quick: bool = False,
    seeds: Sequence[int] = (0, 1, 2),
    target: float = 0.98,
    dataset: str = "mnist",
    data_dir: str | None = None,
    model: str = "mlp",
) -> list[dict[str, Any]]:
    """Train the same model with each schedule over several seeds; write the table and plots."""
    out_dir = Path(out_dir)
    base = schedule_base_config(quick=quick, data_dir=data_dir, dataset=dataset, model=model)
    seeds = seeds[:1] if quick else seeds
    results = run_cells(schedule_cells(base, seeds), out_dir, lambda cell: train_cell(cell, out_dir))
    rows = [schedule_row(result, target) for result in results]
    write_csv(out_dir / "results.csv", rows)
    steps_per_epoch = results[0]["summary"]["optimizer_steps"] // results[0]["summary"]["epochs_run"]
    plot_schedule_lrs(base, steps_per_epoch, out_dir / "lr_schedules.png")
    plot_val_accuracy(results, out_dir / "val_accuracy.png")
    write_schedule_report(out_dir / "report.md", base, rows, seeds, target)
    return rows


def schedule_row(result: dict[str, Any], target: float) -> dict[str, Any]:
    history, summary = result["history"], result["summary"]
    reached = [row["epoch"] for row in history if row.get("val_accuracy", 0.0) >= target]
    return {
        "schedule": result["group"],
        "seed": result["config"]["seed"],
        "best_val_accuracy": max(row["val_accuracy"] for row in history),
        "test_accuracy": summary["test_accuracy"],
        "epochs_to_target": int(reached[0]) if reached else "",
        "wall_seconds": summary["wall_seconds"],
    }


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


def plot_schedule_lrs(base: TrainConfig, steps_per_epoch: int, path: Path) -> None:
    """The lr each schedule uses at every optimizer step of the compared budget."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in COMPARED_SCHEDULES:
        spec = schedule_spec(dataclasses.replace(base, schedule=name, warmup=None).resolved(), steps_per_epoch)
        ax.plot(lr_curve(spec, lr=base.lr, total_steps=steps_per_epoch * base.epochs), label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (mean over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_schedule_report(path: Path, base: TrainConfig, rows: list[dict], seeds: Sequence[int], target: float) -> None:
    table = summary_table(rows, "schedule", ("best_val_accuracy", "test_accuracy", "epochs_to_target", "wall_seconds"))
    text = f"""# Schedule comparison

Model `{base.model}` on `{base.dataset}`, {base.epochs} epochs, batch {base.batch_size}, peak lr {base.lr},
{base.optimizer} (weight decay {base.weight_decay}), seeds {list(seeds)}; no early stopping, so every
schedule gets the same budget. `epochs_to_target`: first epoch with validation accuracy >= {target}.
Test accuracy is measured once, after the last epoch.

{table}

![learning rate per optimizer step](lr_schedules.png)

![validation accuracy per epoch](val_accuracy.png)

Per-run rows: `results.csv`; per-run outputs: `runs/<schedule>-seed<N>/`.
"""
    path.write_text(text)
