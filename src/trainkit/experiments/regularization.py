"""Regularisation comparison: dropout, stochastic depth, weight decay, and where BatchNorm sits.

Regularisers trade training fit for generalisation, so the budget is one where a plain MLP
can overfit (a 10,000-image subset, several epochs, no early stopping): the train-val gap
then shows what each regulariser removes, and test accuracy whether that helped.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainkit.config.schema import TrainConfig
from trainkit.experiments.core import (
    Cell, finish_plot, plot_val_accuracy, run_cells, summary_table, train_cell, write_csv,
)  # fmt: skip
from trainkit.tracking.plots import plt

# Variant name -> what differs from the base config (MLP, BatchNorm, weight decay 0.01).
# Each run appears once: the default block order at dropout 0.3 is the "dropout-0.3" variant,
# and weight decay 0.01 at dropout 0 is "dropout-0.0".
VARIANTS: dict[str, dict[str, Any]] = {
    "dropout-0.0": {"dropout": 0.0},
    "dropout-0.1": {"dropout": 0.1},
    "dropout-0.3": {"dropout": 0.3},
    "dropout-0.5": {"dropout": 0.5},
    "drop_path-0.0": {"model": "residual_mlp", "norm": "layer", "dropout": 0.0, "drop_path": 0.0},
    "drop_path-0.1": {"model": "residual_mlp", "norm": "layer", "dropout": 0.0, "drop_path": 0.1},
    "drop_path-0.2": {"model": "residual_mlp", "norm": "layer", "dropout": 0.0, "drop_path": 0.2},
    "weight_decay-0.0": {"dropout": 0.0, "weight_decay": 0.0},
    "weight_decay-0.05": {"dropout": 0.0, "weight_decay": 0.05},
    "norm_after_dropout-0.3": {"dropout": 0.3, "norm_after_dropout": True},
}

# The report's tables: (row label, variant) per question asked.
REPORT_SECTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "Dropout (MLP, BatchNorm, weight decay 0.01)": (
        ("dropout 0", "dropout-0.0"), ("dropout 0.1", "dropout-0.1"),
        ("dropout 0.3", "dropout-0.3"), ("dropout 0.5", "dropout-0.5"),
    ),
    "Stochastic depth (residual MLP, LayerNorm, no dropout, weight decay 0.01)": (
        ("drop_path 0", "drop_path-0.0"), ("drop_path 0.1", "drop_path-0.1"), ("drop_path 0.2", "drop_path-0.2"),
    ),
    "Weight decay (MLP, BatchNorm, no dropout)": (
        ("weight decay 0", "weight_decay-0.0"), ("weight decay 0.01 (= dropout-0.0)", "dropout-0.0"),
        ("weight decay 0.05", "weight_decay-0.05"),
    ),
    "BatchNorm before or after Dropout (MLP, dropout 0.3)": (
        ("Linear→BN→ReLU→Dropout (default; = dropout-0.3)", "dropout-0.3"),
        ("Linear→ReLU→Dropout→BN", "norm_after_dropout-0.3"),
    ),
}  # fmt: skip
TABLE_COLUMNS = ("train_accuracy", "val_accuracy", "gap", "best_val_accuracy", "test_accuracy", "wall_seconds")


def regularization_base_config(*, quick: bool, dataset: str, data_dir: str | None) -> TrainConfig:
    """A budget in which the unregularised MLP overfits; equal for every variant (no early stopping)."""
    if quick:
        return TrainConfig(dataset="synthetic", model="mlp", hidden=[64], train_size=256, val_size=200,
                           epochs=2, patience=0, device="cpu").resolved()  # fmt: skip
    return TrainConfig(dataset=dataset, data_dir=data_dir, model="mlp", train_size=10_000, epochs=10,
                       patience=0).resolved()  # fmt: skip


def regularization_cells(base: TrainConfig, seeds: Sequence[int]) -> list[Cell]:
    return [
        Cell(key=f"{variant}-seed{seed}", group=variant, config=dataclasses.replace(base, **changes, seed=seed))
        for variant, changes in VARIANTS.items()
        for seed in seeds
    ]


def compare_regularization(
    out_dir: str | Path,
    *,
    quick: bool = False,
    seeds: Sequence[int] = (0, 1, 2),
    dataset: str = "mnist",
    data_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Train every regularisation variant over several seeds; write results.csv, report.md and plots."""
    out_dir = Path(out_dir)
    base = regularization_base_config(quick=quick, dataset=dataset, data_dir=data_dir)
    seeds = seeds[:1] if quick else seeds
    results = run_cells(regularization_cells(base, seeds), out_dir, lambda cell: train_cell(cell, out_dir))
    rows = [regularization_row(result) for result in results]
    write_csv(out_dir / "results.csv", rows)
    plot_gap(rows, out_dir / "train_val_gap.png")
    plot_val_accuracy(results, out_dir / "val_accuracy.png")
    write_regularization_report(out_dir / "report.md", base, rows, seeds)
    return rows


def regularization_row(result: dict[str, Any]) -> dict[str, Any]:
    """Final-epoch accuracies; train accuracy is the running one of the last epoch (dropout on)."""
    history, summary = result["history"], result["summary"]
    last = history[-1]
    return {
        "variant": result["group"],
        "seed": result["config"]["seed"],
        "train_accuracy": last["train_accuracy"],
        "val_accuracy": last["val_accuracy"],
        "gap": last["train_accuracy"] - last["val_accuracy"],
        "best_val_accuracy": max(row["val_accuracy"] for row in history),
        "test_accuracy": summary["test_accuracy"],
        "wall_seconds": summary["wall_seconds"],
    }


def section_table(rows: list[dict[str, Any]], labelled: Sequence[tuple[str, str]]) -> str:
    """The mean ± std table of the ``(label, variant)`` pairs, in that order."""
    relabelled = [{**row, "variant": label} for label, variant in labelled for row in rows if row["variant"] == variant]
    return summary_table(relabelled, "variant", TABLE_COLUMNS)


def plot_gap(rows: list[dict[str, Any]], path: Path) -> None:
    """Final train-val gap per variant: mean over seeds, with each seed as a dot."""
    gaps = {variant: [row["gap"] for row in rows if row["variant"] == variant] for variant in VARIANTS}
    fig, ax = plt.subplots(figsize=(9, 4))
    positions = range(len(gaps))
    ax.bar(positions, [statistics.mean(values) for values in gaps.values()], alpha=0.6, label="mean over seeds")
    for position, values in zip(positions, gaps.values()):
        ax.plot([position] * len(values), values, "k.", markersize=5, label="one seed" if position == 0 else None)
    ax.set_xticks(list(positions), list(gaps), rotation=30, ha="right")
    ax.axhline(0.0, color="black", linewidth=0.8)
    finish_plot(fig, ax, path, xlabel="variant", ylabel="final train − val accuracy")


def write_regularization_report(path: Path, base: TrainConfig, rows: list[dict], seeds: Sequence[int]) -> None:
    sections = "\n\n".join(
        f"## {title}\n\n{section_table(rows, labelled)}" for title, labelled in REPORT_SECTIONS.items()
    )
    total_minutes = sum(row["wall_seconds"] for row in rows) / 60
    text = f"""# Regularisation comparison

`{base.dataset}`, the first {base.train_size} training images, {base.epochs} epochs for every run (no early
stopping), batch {base.batch_size}, AdamW lr {base.lr}, {base.schedule}, seeds {list(seeds)}. Unless a variant
says otherwise: MLP {base.hidden} with BatchNorm (Linear→BN→ReLU→Dropout) and weight decay {base.weight_decay};
the residual MLP is 4 pre-LayerNorm blocks of width 256. Training time of all runs: {total_minutes:.1f} min.

`train_accuracy` and `val_accuracy` are the last epoch's; `gap` = train − val. Train accuracy is the
running accuracy over the last epoch in training mode (dropout and drop-path active), so a strong
regulariser lowers it. Test accuracy is measured once, after the last epoch.

{sections}

![final train-val gap per variant](train_val_gap.png)

![validation accuracy per epoch](val_accuracy.png)

## What it shows

_For the lead to write after reading the numbers._

Per-run rows: `results.csv`; per-run outputs: `runs/<variant>-seed<N>/`.
"""
    path.write_text(text)
