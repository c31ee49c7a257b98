"""Initialisation comparison: a deep plain MLP under each init scheme, where init is all that matters.

The MLP has no normalisation, no dropout and no residual connections, so nothing but the init
scheme sets the scale of its signals. Each cell (activation × scheme × seed) records the signal
at init (``trainkit.nn.diagnostics``: activation std, weight-gradient norms and dead ReLUs per layer),
the training loss after a fixed number of optimizer steps, the final accuracies, and whether
training diverged (a NaN/inf loss is a result here, not a crash).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainkit.loop.callbacks import Callback, TrainState
from trainkit.config.schema import TrainConfig
from trainkit.nn.diagnostics import Diagnostics, LayerStats, signal_diagnostics
from trainkit.errors import NonFiniteLossError
from trainkit.experiments.core import Cell, mean_std, plot_val_accuracy, read_history, run_cells, write_csv
from trainkit.tracking.plots import plt
from trainkit.recipes.run import train_run
from trainkit.recipes.components import build_model_from_config, load_training_data, seed_everything

log = logging.getLogger("trainkit")

INIT_SCHEMES_COMPARED = ("uniform", "normal", "xavier_uniform", "kaiming_normal", "lecun_normal", "orthogonal")

# Full mode: a budget that runs the default 36 cells (depth 12, width 256) in ~6 minutes on a 2-core CPU.
FULL_EPOCHS = 4
FULL_TRAIN_SIZE = 20_000
# Quick mode: caps that make the whole comparison take seconds.
QUICK_DEPTH, QUICK_WIDTH, QUICK_STEPS_FOR_LOSS = 6, 64, 10

# x and y labels of the per-layer plots, by LayerStats field
PROFILE_LABELS = {
    "activation_std": ("hidden layer", "hidden activation std at init"),
    "grad_norm": ("Linear layer (the last is the head)", "weight grad norm at init"),
}
SUMMARY_COLUMNS = (
    "init_last_std", "init_min_grad_norm", "init_max_grad_norm", "dead_fraction",
    "loss_at_steps", "best_val_accuracy", "test_accuracy", "wall_seconds",
)  # fmt: skip


class LossAtStep(Callback):
    """Records the training loss at one optimizer step: how quickly training gets going."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.loss: float | None = None  # None: training never got that far

    def on_batch_end(self, state: TrainState, loss: torch.Tensor) -> None:
        if state.global_step == self.step:
            self.loss = float(loss)  # one device sync, at this step only


def compare_init(
    out_dir: str | Path,
    *,
    quick: bool = False,
    seeds: Sequence[int] = (0, 1, 2),
    dataset: str = "mnist",
    data_dir: str | None = None,
    depth: int = 12,
    width: int = 256,
    activations: Sequence[str] = ("relu", "tanh"),
    steps_for_loss: int = 100,
) -> list[dict[str, Any]]:
    """Train the deep plain MLP under each init scheme and activation; write the table and plots.

    ``quick``: synthetic data, one seed, one epoch, and depth/width/steps_for_loss capped small.
    """
    out_dir = Path(out_dir)
    if quick:
        seeds, depth, width = seeds[:1], min(depth, QUICK_DEPTH), min(width, QUICK_WIDTH)
        steps_for_loss = min(steps_for_loss, QUICK_STEPS_FOR_LOSS)
    base = init_base_config(quick=quick, dataset=dataset, data_dir=data_dir, depth=depth, width=width)
    cells = init_cells(base, activations, seeds, steps_for_loss)
    results = run_cells(cells, out_dir, lambda cell: run_init_cell(cell, out_dir, steps_for_loss))
    rows = [init_row(result) for result in results]
    write_csv(out_dir / "results.csv", rows)
    plot_init_profiles(results, activations, "activation_std", out_dir / "init_activation_std.png")
    plot_init_profiles(results, activations, "grad_norm", out_dir / "init_grad_norm.png")
    plot_val_accuracy_per_activation(results, activations, out_dir)
    write_init_report(out_dir / "report.md", base, rows, seeds, steps_for_loss)
    return rows


def init_base_config(*, quick: bool, dataset: str, data_dir: str | None, depth: int, width: int) -> TrainConfig:
    """One fixed, modest recipe for every cell; no early stopping, so budgets are equal."""
    common: dict[str, Any] = {
        "model": "mlp", "hidden": [width] * depth, "norm": "none", "dropout": 0.0,
        "optimizer": "adamw", "lr": 1e-3, "schedule": "warmup_cosine", "clip_norm": 1.0, "patience": 0,
        "keep_checkpoints": 1,  # cells are never resumed, so one checkpoint file per run is enough
    }  # fmt: skip
    if quick:
        return TrainConfig(dataset="synthetic", epochs=1, device="cpu", val_size=500, **common).resolved()
    return TrainConfig(
        dataset=dataset, data_dir=data_dir, epochs=FULL_EPOCHS, train_size=FULL_TRAIN_SIZE, **common
    ).resolved()


def init_cells(
    base: TrainConfig, activations: Sequence[str], seeds: Sequence[int], steps_for_loss: int
) -> list[Cell]:
    """One cell per (activation, scheme, seed). ``steps_for_loss`` is not part of the config, so it
    goes into the key: another value re-runs the cell instead of reusing a loss from another step."""
    return [
        Cell(
            key=f"{activation}-{scheme}-seed{seed}-loss{steps_for_loss}",
            group=f"{activation} {scheme}",
            config=dataclasses.replace(base, activation=activation, init=scheme, seed=seed),
        )
        for activation in activations
        for scheme in INIT_SCHEMES_COMPARED
        for seed in seeds
    ]


# ------------------------------------------------------------------------------ one cell


def run_init_cell(cell: Cell, out_dir: Path, steps_for_loss: int) -> dict[str, Any]:
    """Diagnose the model at init, then train it; a NaN/inf loss is recorded as ``diverged``."""
    started = time.perf_counter()
    signal = signal_at_init(cell.config)
    loss_probe = LossAtStep(steps_for_loss)
    try:
        summary, history = train_recording(cell, out_dir, loss_probe)
    except NonFiniteLossError as error:
        log.warning("%s diverged: %s", cell.key, error)
        summary, history = None, []
    return {
        "init_layers": signal.to_rows(),
        "init_loss": signal.loss,
        "loss_at_steps": loss_probe.loss,
        "diverged": summary is None,
        "summary": summary,
        "history": history,
        "wall_seconds": round(time.perf_counter() - started, 3),
    }


def signal_at_init(config: TrainConfig) -> Diagnostics:
    """Diagnostics of exactly the model ``train_run`` starts from (same seeding), on a training batch."""
    seed_everything(config.seed)
    data = load_training_data(config, torch.device("cpu"))
    model = build_model_from_config(config, data)
    first_batch = slice(0, config.batch_size)
    return signal_diagnostics(model, data.train.x[first_batch], data.train.y[first_batch])


def train_recording(cell: Cell, out_dir: Path, callback: Callback) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """``core.train_cell`` with an extra callback: a fresh run dir, then the summary and history."""
    run_dir = out_dir / "runs" / cell.key
    if run_dir.exists():
        shutil.rmtree(run_dir)
    summary = train_run(dataclasses.replace(cell.config, out=str(run_dir)), extra_callbacks=[callback])
    return summary, read_history(run_dir / "history.csv")


def cell_signal(result: dict[str, Any]) -> Diagnostics:
    """The init diagnostics of a (possibly cached) cell result."""
    return Diagnostics([LayerStats(**row) for row in result["init_layers"]], result["init_loss"])


def init_row(result: dict[str, Any]) -> dict[str, Any]:
    """The cell's line in results.csv; accuracy fields are empty for a diverged run."""
    config, signal = result["config"], cell_signal(result)
    grad_norms = [layer.grad_norm for layer in signal.weight_layers()]
    dead = [layer.dead_fraction for layer in signal.layers if layer.dead_fraction is not None]
    trained = not result["diverged"]
    return {
        "activation": config["activation"],
        "init": config["init"],
        "seed": config["seed"],
        "init_last_std": signal.activation_layers()[-1].activation_std,
        "init_min_grad_norm": float(np.min(grad_norms)),  # NaN if any is NaN
        "init_max_grad_norm": float(np.max(grad_norms)),
        "dead_fraction": float(np.mean(dead)) if dead else "",  # over the ReLU layers; empty for tanh
        "loss_at_steps": "" if result["loss_at_steps"] is None else result["loss_at_steps"],
        "best_val_accuracy": max(row["val_accuracy"] for row in result["history"]) if trained else "",
        "test_accuracy": result["summary"]["test_accuracy"] if trained else "",
        "diverged": result["diverged"],
        "wall_seconds": result["wall_seconds"],
    }


# ------------------------------------------------------------------------- table and plots


def init_summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (activation, init), each column as mean ± std over its seeds.

    Like ``core.summary_table``, but with significant digits (signals at init span 1e-10..1e10),
    a count of diverged seeds, and non-finite values kept as inf/nan.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["activation"], row["init"]), []).append(row)
    lines = [
        "| activation | init | seeds | diverged | " + " | ".join(SUMMARY_COLUMNS) + " |",
        "|---" * (len(SUMMARY_COLUMNS) + 4) + "|",
    ]
    for (activation, scheme), members in groups.items():
        diverged = sum(member["diverged"] for member in members)
        cells = [mean_std_significant([float(m[c]) for m in members if m[c] != ""]) for c in SUMMARY_COLUMNS]
        lines.append(f"| {activation} | {scheme} | {len(members)} | {diverged} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_std_significant(values: Sequence[float]) -> str:
    """mean ± std with significant digits: init statistics span 1e-2 to 1e13."""
    return mean_std(values, value_format=".4g", spread_format=".2g")


def layer_profile(result: dict[str, Any], field: str) -> list[float]:
    """Per hidden layer (or per weight layer, for ``grad_norm``) values at init; non-finite as NaN."""
    signal = cell_signal(result)
    layers = signal.weight_layers() if field == "grad_norm" else signal.activation_layers()
    values = [getattr(layer, field) for layer in layers]
    return [value if np.isfinite(value) else float("nan") for value in values]


def plot_init_profiles(results: list[dict[str, Any]], activations: Sequence[str], field: str, path: Path) -> None:
    """One panel per activation: ``field`` at init against depth (log y), one line per scheme (mean over seeds)."""
    xlabel, ylabel = PROFILE_LABELS[field]
    fig, axes = plt.subplots(1, len(activations), figsize=(6 * len(activations), 4.5), squeeze=False)
    for ax, activation in zip(axes[0], activations):
        for scheme in INIT_SCHEMES_COMPARED:
            profiles = [
                layer_profile(result, field)
                for result in results
                if result["config"]["activation"] == activation and result["config"]["init"] == scheme
            ]
            if profiles:
                mean = np.mean(profiles, axis=0)
                ax.plot(range(1, len(mean) + 1), mean, marker="o", markersize=3, label=scheme)
        ax.set_yscale("log")
        ax.set_title(activation)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_val_accuracy_per_activation(results: list[dict[str, Any]], activations: Sequence[str], out_dir: Path) -> None:
    """``val_accuracy_<activation>.png``: one file per activation keeps each plot to six distinct lines."""
    for activation in activations:
        trained = [r for r in results if r["config"]["activation"] == activation and not r["diverged"]]
        if trained:
            plot_val_accuracy(trained, out_dir / f"val_accuracy_{activation}.png")


def write_init_report(
    path: Path, base: TrainConfig, rows: list[dict[str, Any]], seeds: Sequence[int], steps_for_loss: int
) -> None:
    """report.md: the setup, what each column means, the table, the diverged runs and the plots."""
    diverged = [f"{row['activation']} {row['init']} seed {row['seed']}" for row in rows if row["diverged"]]
    accuracy_plots = "\n\n".join(
        f"![validation accuracy per epoch, {activation}](val_accuracy_{activation}.png)"
        for activation in dict.fromkeys(row["activation"] for row in rows)
    )
    training_images = f"the first {base.train_size}" if base.train_size else "all"
    text = f"""# Initialisation comparison

A plain MLP with {len(base.hidden)} hidden layers of width {base.hidden[0]} on `{base.dataset}`: no
normalisation, no dropout, no residuals, so the init scheme alone sets the scale of the signal.
Every cell trains {base.epochs} epochs on {training_images} training images with {base.optimizer}
(lr {base.lr}, {base.schedule}, clip-norm {base.clip_norm}), no early stopping; seeds {list(seeds)}.

At init, one forward/backward pass on the first training batch (`trainkit.nn.diagnostics`):
`init_last_std` is the std of the last hidden activation, `init_min/max_grad_norm` the smallest and
largest weight-gradient norm over the Linear layers, `dead_fraction` the share of ReLU units that
output 0 for every sample of the batch (mean over layers; empty for tanh). `loss_at_steps`: the
training loss at optimizer step {steps_for_loss}. `diverged`: seeds whose training loss became NaN/inf
(their accuracy fields are empty). `wall_seconds` per cell.

{init_summary_table(rows)}

Diverged runs: {", ".join(diverged) if diverged else "none"}.

![hidden activation std at init per layer](init_activation_std.png)

![weight gradient norm at init per layer](init_grad_norm.png)

{accuracy_plots}

Per-run rows: `results.csv`; per-run outputs: `runs/<activation>-<init>-seed<N>-loss<steps>/`.
"""
    path.write_text(text)
