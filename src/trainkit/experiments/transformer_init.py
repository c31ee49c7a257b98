"""Transformer init comparison: GPT-2's scaled residual init against the alternatives, by depth.

GPT-2 draws every weight from N(0, 0.02) and the projections that write into the residual
stream from N(0, 0.02/sqrt(2 x layers)): each block adds to the stream, so without the scaling
its variance grows with depth. Here: `gpt`, `gpt_unscaled`, PyTorch's default and Xavier at
several depths: the residual stream's std after each block at initialisation (on a real
training batch), and the validation loss after a fixed budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainkit.recipes.components import build_model_from_config, load_training_data, seed_everything, training_batches
from trainkit.config.schema import TrainConfig
from trainkit.experiments.core import Cell, finish_plot, summary_table, write_csv
from trainkit.experiments.sequence import run_traced_cell, setup_comparison, trace_row
from trainkit.tracking.plots import plt

SCHEMES = ("gpt", "gpt_unscaled", "default", "xavier")
FULL = {"steps": 300, "depths": (4, 12, 24), "seeds": (0,)}
QUICK = {"steps": 20, "depths": (2, 4), "seeds": (0,)}


def init_cells(base: TrainConfig, plan: dict[str, Any], seeds: Sequence[int]) -> list[Cell]:
    return [
        Cell(key=f"{scheme}-layers{depth}-seed{seed}", group=f"{scheme}, {depth} layers",
             config=dataclasses.replace(base, init=scheme, layers=depth, seed=seed))  # fmt: skip
        for depth in plan["depths"]
        for scheme in SCHEMES
        for seed in seeds
    ]


def residual_stream_std(config: TrainConfig) -> list[float]:
    """The std of the residual stream after the embeddings and after each block, at init, on the
    run's first training batch: the model train_run starts from (same seeding)."""
    seed_everything(config.seed)
    data = load_training_data(config, torch.device("cpu"))
    model = build_model_from_config(config, data).eval()
    inputs, _ = next(training_batches(config, data).epoch(1))
    with torch.no_grad():
        return [stream.std().item() for stream in model.residual_stream(inputs)]


def run_init_cell(cell: Cell, out_dir: Path, unigram: float) -> dict[str, Any]:
    return {"stream_std": residual_stream_std(cell.config), **run_traced_cell(cell, out_dir, unigram)}


def compare_transformer_init(
    out_dir: str | Path, *, quick: bool = False, seeds: Sequence[int] | None = None, data_file: str | None = None,
    **_: Any,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run every cell (cached), then write results.csv, report.md and the signal plot."""
    setting = setup_comparison(out_dir, quick=quick, seeds=seeds, data_file=data_file, full=FULL, quick_plan=QUICK)
    out_dir, plan, seeds, base = setting.out_dir, setting.plan, setting.seeds, setting.bases["transformer"]
    results = setting.run(init_cells(base, plan, seeds), run_init_cell)
    rows = []
    for result in results:
        stream = result["stream_std"]
        rows.append({"cell": result["group"], "init": result["config"]["init"], "layers": result["config"]["layers"],
                     "seed": result["config"]["seed"], "stream_std_embedding": round(stream[0], 4),
                     "stream_std_last_block": round(stream[-1], 4), "stream_growth": round(stream[-1] / stream[0], 3),
                     **trace_row(result, result["config"]["clip_norm"])})  # fmt: skip
    write_csv(out_dir / "results.csv", rows)
    plot_stream(results, max(plan["depths"]), out_dir / "residual_stream_std.png")
    write_report(out_dir / "report.md", base, rows, seeds, setting.unigram, plan)
    return rows


def plot_stream(results: list[dict[str, Any]], depth: int, path: Path) -> None:
    """Residual-stream std after each block at init, one line per scheme, at the largest depth."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for result in results:
        if result["config"]["layers"] == depth and result["config"]["seed"] == results[0]["config"]["seed"]:
            ax.plot(range(len(result["stream_std"])), result["stream_std"], marker="o", markersize=3,
                    label=result["config"]["init"])  # fmt: skip
    ax.set_yscale("log")
    finish_plot(fig, ax, path, xlabel="block (0 = embeddings)", ylabel=f"residual stream std at init ({depth} layers)")


def write_report(path: Path, base: TrainConfig, rows: list[dict[str, Any]], seeds: Sequence[int], unigram: float,
                 plan: dict[str, Any]) -> None:  # fmt: skip
    table = summary_table(rows, "cell", ("stream_std_embedding", "stream_std_last_block", "stream_growth", "val_loss",
                                         "diverged", "max_grad_norm"))  # fmt: skip
    text = f"""# Transformer init comparison

`{base.data_file}`, {base.tokenizer} tokenizer; pre-norm Transformer, {base.heads} heads x width {base.width},
block {base.block_size}, batch {base.batch_size}, {plan['steps']} optimizer steps (the text recipe's lr {base.lr:g},
warmup and cosine schedule, clipping at {base.clip_norm}), {base.precision}, seeds {list(seeds)}, depths
{list(plan['depths'])} layers.

Schemes: `gpt` (N(0, 0.02), residual projections N(0, 0.02/sqrt(2 x layers))), `gpt_unscaled` (N(0, 0.02)
everywhere), `default` (PyTorch's own: N(0, 1) embeddings, Kaiming-uniform Linear layers), `xavier`
(Glorot-uniform Linear layers; embeddings as PyTorch's). `stream_growth`: the residual stream's std after
the last block over its std after the embeddings, at init. `diverged`: NaN/inf, or a final validation
loss no better than the unigram entropy ({unigram:.3f} nats).

{table}

![residual stream std at init](residual_stream_std.png)

Per-run rows: `results.csv`; per-run outputs: `runs/<cell>/`.
"""
    path.write_text(text)
