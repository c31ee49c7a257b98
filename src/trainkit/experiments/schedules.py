"""Schedule comparison: the same model and budget under each learning-rate schedule."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainkit.config.schema import TrainConfig
from trainkit.experiments.core import (
    Cell, finish_plot, plot_val_accuracy, run_cells, summary_table, train_cell, write_csv,
)  # fmt: skip
from trainkit.tracking.plots import plt
from trainkit.optim.schedules import lr_curve
from trainkit.loop.lr import schedule_spec

COMPARED_SCHEDULES = ("constant", "step", "cosine", "warmup_cosine", "onecycle")


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


def plot_schedule_lrs(base: TrainConfig, steps_per_epoch: int, path: Path) -> None:
    """The lr each schedule uses at every optimizer step of the compared budget."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in COMPARED_SCHEDULES:
        spec = schedule_spec(dataclasses.replace(base, schedule=name, warmup=None).resolved(), steps_per_epoch)
        ax.plot(lr_curve(spec, lr=base.lr, total_steps=steps_per_epoch * base.epochs), label=name)
    finish_plot(fig, ax, path, xlabel="optimizer step", ylabel="learning rate")


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
