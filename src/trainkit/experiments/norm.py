"""Normalisation comparison: each norm layer across batch sizes, and the eval-mode pitfall.

BatchNorm normalises with the statistics of the current batch, so its behaviour depends on
the batch size (noisy statistics at batch 8) and differs between training and evaluation
(running statistics); LayerNorm and GroupNorm normalise each sample on its own and do
neither. The grid trains every (model, norm, batch size) cell for the same number of epochs,
with the learning rate scaled to the batch size, so the table shows where each norm holds up.

The eval-mode pitfall: evaluating a BatchNorm network in training mode, one sample at a time,
normalises each image with its own statistics instead of the learned running ones.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from trainkit.config.files import config_from_dict
from trainkit.config.schema import TrainConfig
from trainkit.errors import ConfigError
from trainkit.experiments.core import Cell, mean_std, run_cells, train_cell, write_csv
from trainkit.tracking.plots import plt
from trainkit.recipes.components import build_model_from_config, load_training_data
from trainkit.devices import resolve_device

BATCH_SIZES = (8, 32, 128, 512)
NORMS_BY_MODEL: dict[str, tuple[str, ...]] = {
    "mlp": ("none", "batch", "layer"),
    "cnn": ("none", "batch", "layer", "group"),
}
LR_SCALINGS = ("sqrt", "linear", "none")
BASE_LR = 1e-3  # AdamW's production lr, tuned at batch 128

# Full-mode budget for the project's 2-core CPU, where batch 8 means many small steps. Measured
# on an idle machine: an MLP cell takes 1-7 s, a CNN cell on half the images 10-16 s (its
# validation and test passes are much of that); the whole grid with one seed about 4 minutes.
FULL_EPOCHS = 2
FULL_TRAIN_SIZE = {"mlp": 10_000, "cnn": 5_000}


# ------------------------------------------------------------------------ cells


def scaled_lr(base_lr: float, batch_size: int, base_batch: int, rule: str) -> float:
    """The lr for ``batch_size``: "sqrt" keeps the gradient-noise scale of Adam comparable."""
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size / base_batch)
    if rule == "linear":
        return base_lr * batch_size / base_batch
    if rule == "none":
        return base_lr
    raise ConfigError(f"lr_scaling must be one of {', '.join(LR_SCALINGS)}; got {rule!r}")


def norm_base_config(model: str, *, quick: bool, dataset: str, data_dir: str | None) -> TrainConfig:
    """One budget for every norm and batch size of ``model``: fixed epochs, no early stopping.

    No dropout and no augmentation, so the norm layer is the only thing that behaves
    differently in training and evaluation.
    """
    same_for_all = {"model": model, "dropout": 0.0, "augment_shift": 0, "patience": 0, "lr": BASE_LR, "warmup": 0.2}
    if quick:
        return TrainConfig(dataset="synthetic", train_size=256, val_size=200, epochs=1, hidden=[64],
                           device="cpu", **same_for_all).resolved()  # fmt: skip
    return TrainConfig(dataset=dataset, data_dir=data_dir, train_size=FULL_TRAIN_SIZE[model],
                       epochs=FULL_EPOCHS, **same_for_all).resolved()  # fmt: skip


def norm_cells(bases: dict[str, TrainConfig], seeds: Sequence[int], *, base_batch: int, lr_scaling: str) -> list[Cell]:
    """Every (model, norm, batch size, seed), the lr scaled from ``base_batch`` by ``lr_scaling``."""
    return [
        Cell(
            key=f"{model}-{norm}-bs{batch_size}-seed{seed}",
            group=f"{model}-{norm}",
            config=dataclasses.replace(
                base,
                norm=norm,
                batch_size=batch_size,
                seed=seed,
                lr=scaled_lr(base.lr, batch_size, base_batch, lr_scaling),
            ),
        )
        for model, base in bases.items()
        for norm in NORMS_BY_MODEL[model]
        for batch_size in BATCH_SIZES
        for seed in seeds
    ]


def compare_norm(
    out_dir: str | Path,
    *,
    quick: bool = False,
    seeds: Sequence[int] = (0,),
    dataset: str = "mnist",
    data_dir: str | None = None,
    base_batch: int = 128,
    lr_scaling: str = "sqrt",
) -> list[dict[str, Any]]:
    """Train every norm at every batch size; write results.csv, report.md, plots and the pitfall."""
    out_dir = Path(out_dir)
    scaled_lr(BASE_LR, base_batch, base_batch, lr_scaling)  # reject an unknown rule before training
    bases = {
        model: norm_base_config(model, quick=quick, dataset=dataset, data_dir=data_dir) for model in NORMS_BY_MODEL
    }
    seeds = seeds[:1] if quick else seeds
    cells = norm_cells(bases, seeds, base_batch=base_batch, lr_scaling=lr_scaling)
    results = run_cells(cells, out_dir, lambda cell: train_cell(cell, out_dir))
    rows = [norm_row(result) for result in results]
    write_csv(out_dir / "results.csv", rows)
    plot_by_batch_size(rows, "test_accuracy", "test accuracy", out_dir / "accuracy_vs_batch_size.png")
    plot_by_batch_size(rows, "wall_seconds", "wall seconds per run", out_dir / "wall_seconds_vs_batch_size.png")
    pitfall = [pitfall_for_cell(result, out_dir) for result in batchnorm_results(results, base_batch, seeds[0])]
    (out_dir / "eval_mode_pitfall.json").write_text(json.dumps(pitfall, indent=2) + "\n")
    write_norm_report(out_dir / "report.md", bases, rows, pitfall, seeds=seeds, base_batch=base_batch,
                      lr_scaling=lr_scaling)  # fmt: skip
    return rows


def closest_batch_size(batch_size: int) -> int:
    return min(BATCH_SIZES, key=lambda size: abs(size - batch_size))


def batchnorm_results(results: list[dict[str, Any]], base_batch: int, seed: int) -> list[dict[str, Any]]:
    """The BatchNorm cell of each model at the base batch size: the eval-mode pitfall's subjects."""
    return [
        result for result in results
        if (result["config"]["norm"], result["config"]["batch_size"], result["config"]["seed"])
        == ("batch", closest_batch_size(base_batch), seed)
    ]  # fmt: skip


def norm_row(result: dict[str, Any]) -> dict[str, Any]:
    config, summary, history = result["config"], result["summary"], result["history"]
    return {
        "model": config["model"],
        "norm": config["norm"],
        "batch_size": config["batch_size"],
        "lr": config["lr"],
        "seed": config["seed"],
        "test_accuracy": summary["test_accuracy"],
        "best_val_accuracy": max(row["val_accuracy"] for row in history),
        "final_train_loss": history[-1]["train_loss"],
        "wall_seconds": summary["wall_seconds"],
    }


# ------------------------------------------------------------ eval-mode pitfall


def eval_mode_pitfall(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eval_batch_size: int = 1024) -> dict:
    """Accuracy in eval mode vs. in training mode with batch size 1, measured on copies of ``model``.

    Training mode makes BatchNorm normalise with the batch's own statistics (and update its
    running statistics), so the probe runs on copies: ``model`` keeps its weights, buffers and
    mode. BatchNorm1d refuses a batch of one in training mode; that error is recorded as the result.
    """
    proper = accuracy(copy_in_mode(model, training=False), x, y, eval_batch_size)
    try:
        one_at_a_time = accuracy(copy_in_mode(model, training=True), x, y, batch_size=1)
    except ValueError as error:  # "Expected more than 1 value per channel when training"
        return {"eval_accuracy": proper, "train_mode_batch1_accuracy": None, "gap": None, "error": str(error)}
    return {"eval_accuracy": proper, "train_mode_batch1_accuracy": one_at_a_time,
            "gap": proper - one_at_a_time, "error": None}  # fmt: skip


def copy_in_mode(model: nn.Module, *, training: bool) -> nn.Module:
    return copy.deepcopy(model).train(training)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Fraction of ``x`` classified as ``y``, in whatever mode ``model`` is in."""
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size].to(device))
        correct += int((logits.argmax(dim=1) == y[start : start + batch_size].to(device)).sum())
    return correct / len(x)


def pitfall_for_cell(result: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The pitfall on a finished cell's final weights (``runs/<key>/model.safetensors``) and test set."""
    config = config_from_dict(result["config"]).resolved()
    device = resolve_device(config.device)
    data = load_training_data(config, device)
    model = build_model_from_config(config, data).to(device)
    model.load_state_dict(load_file(out_dir / "runs" / result["key"] / "model.safetensors", device=str(device)))
    return {
        "cell": result["key"],
        "model": config.model,
        "norm": config.norm,
        "batch_size": config.batch_size,
        "reported_test_accuracy": result["summary"]["test_accuracy"],
        **eval_mode_pitfall(model, data.test.x, data.test.y, eval_batch_size=config.eval_batch_size),
    }


# ------------------------------------------------------------------ report, plots


def values_by_cell(rows: list[dict[str, Any]], column: str) -> dict[tuple[str, str, int], list[float]]:
    """``column`` of every seed, keyed by (model, norm, batch size)."""
    grouped: dict[tuple[str, str, int], list[float]] = {}
    for row in rows:
        grouped.setdefault((row["model"], row["norm"], row["batch_size"]), []).append(float(row[column]))
    return grouped


def batch_size_table(rows: list[dict[str, Any]], column: str, value_format: str = ".4f") -> str:
    """Markdown: one line per (model, norm), one column per batch size, mean ± std over seeds."""
    values = values_by_cell(rows, column)
    lines = [
        "| model | norm | " + " | ".join(f"batch {size}" for size in BATCH_SIZES) + " |",
        "|---" * (len(BATCH_SIZES) + 2) + "|",
    ]
    for model, norms in NORMS_BY_MODEL.items():
        for norm in norms:
            cells = [mean_std(values.get((model, norm, size), []), value_format, value_format) for size in BATCH_SIZES]
            lines.append(f"| {model} | {norm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pitfall_table(pitfall: list[dict[str, Any]]) -> str:
    lines = ["| cell | eval mode | train mode, batch 1 | gap |", "|---|---|---|---|"]
    for probe in pitfall:
        if probe["error"] is None:
            one = f"{probe['train_mode_batch1_accuracy']:.4f}"
            gap = f"{probe['gap']:.4f}"
        else:
            one, gap = f"error: `{probe['error']}`", "–"
        lines.append(f"| {probe['cell']} | {probe['eval_accuracy']:.4f} | {one} | {gap} |")
    return "\n".join(lines)


def plot_by_batch_size(rows: list[dict[str, Any]], column: str, ylabel: str, path: Path) -> None:
    """``column`` (mean over seeds) against batch size: one panel per model, one line per norm."""
    values = values_by_cell(rows, column)
    fig, axes = plt.subplots(1, len(NORMS_BY_MODEL), figsize=(5 * len(NORMS_BY_MODEL), 4), squeeze=False)
    for ax, (model, norms) in zip(axes[0], NORMS_BY_MODEL.items()):
        for norm in norms:
            means = [statistics.mean(values[(model, norm, size)]) for size in BATCH_SIZES]
            ax.plot(BATCH_SIZES, means, marker="o", label=norm)
        ax.set_xscale("log", base=2)
        ax.set_xticks(BATCH_SIZES, [str(size) for size in BATCH_SIZES])
        ax.set_title(model)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.legend(title="norm")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_norm_report(
    path: Path,
    bases: dict[str, TrainConfig],
    rows: list[dict[str, Any]],
    pitfall: list[dict[str, Any]],
    *,
    seeds: Sequence[int],
    base_batch: int,
    lr_scaling: str,
) -> None:
    mlp, cnn = bases["mlp"], bases["cnn"]
    lrs = ", ".join(f"{size}: {scaled_lr(BASE_LR, size, base_batch, lr_scaling):.3g}" for size in BATCH_SIZES)
    total_minutes = sum(float(row["wall_seconds"]) for row in rows) / 60
    text = f"""# Normalisation comparison

`{mlp.dataset}`; MLP (hidden {mlp.hidden}) on the first {mlp.train_size} training images, CNN on the
first {cnn.train_size}; {mlp.epochs} epoch(s) for every cell, no early stopping, no dropout, no
augmentation, seeds {list(seeds)}. AdamW (weight decay {mlp.weight_decay}), {mlp.schedule}; lr {BASE_LR}
at batch {base_batch}, scaled by the {lr_scaling} rule, per batch size: {lrs}.
Test accuracy is measured once, after the last epoch. Training time of all cells: {total_minutes:.1f} min.

## Test accuracy

{batch_size_table(rows, "test_accuracy")}

![test accuracy against batch size](accuracy_vs_batch_size.png)

## Wall seconds per run

{batch_size_table(rows, "wall_seconds", ".1f")}

![wall seconds against batch size](wall_seconds_vs_batch_size.png)

## Eval-mode pitfall

The final weights of the BatchNorm cells at batch {closest_batch_size(base_batch)}, on the test set: properly
in eval mode (running statistics), and in training mode one image at a time (each image
normalised with its own statistics; run on a copy, because a training-mode forward also
updates the running statistics). BatchNorm1d (the MLP) refuses a batch of one in training mode.

{pitfall_table(pitfall)}

## What it shows

_For the lead to write after reading the numbers._

Per-run rows: `results.csv`; pitfall numbers: `eval_mode_pitfall.json`; per-run outputs:
`runs/<model>-<norm>-bs<N>-seed<S>/`.
"""
    path.write_text(text)
