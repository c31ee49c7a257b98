"""Norm comparison for sequence models: LayerNorm, RMSNorm, none and BatchNorm in the
Transformer and the LSTM.

LayerNorm is the standard for Transformers; RMSNorm drops its mean-centring; BatchNorm is
said to break for sequences. In a causal language model it does worse than break: its
training-time statistics over batch and time mix in the tokens a position must not see, and
at evaluation the running averages replace them, so the training loss flatters and the
validation loss does not follow. Here: each norm in each model, the same budget and seeds,
with the final training loss beside the validation loss (the gap shows that leak).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainkit.experiments.clipping import describe_model
from trainkit.experiments.core import Cell, summary_table, write_csv
from trainkit.experiments.sequence import plot_traces, setup_comparison, trace_row
from trainkit.choices import SEQUENCE_NORMS

FULL = {"steps": 500, "seeds": (0,), "models": ("transformer", "lstm")}
QUICK = {"steps": 20, "seeds": (0,), "models": ("transformer",)}
FINAL_STEPS = 50  # the training loss at the end: the mean of the last 50 steps' losses


def norm_cells(bases: dict[str, Any], seeds: Sequence[int]) -> list[Cell]:
    """Every model of ``bases`` with every norm and seed."""
    return [
        Cell(key=f"{model}-{norm}-seed{seed}", group=f"{model}, {norm} norm",
             config=dataclasses.replace(bases[model], norm=norm, seed=seed))  # fmt: skip
        for model in bases
        for norm in SEQUENCE_NORMS
        for seed in seeds
    ]


def compare_sequence_norm(
    out_dir: str | Path, *, quick: bool = False, seeds: Sequence[int] | None = None, data_file: str | None = None,
    **_: Any,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run every cell (cached), then write results.csv, report.md and the loss plots."""
    setting = setup_comparison(out_dir, quick=quick, seeds=seeds, data_file=data_file, full=FULL, quick_plan=QUICK)
    out_dir, plan, seeds, bases = setting.out_dir, setting.plan, setting.seeds, setting.bases
    results = setting.run(norm_cells(bases, seeds))
    rows = []
    for result in results:
        train_loss = final_training_loss(result["losses"])
        val = result["val_loss"]
        rows.append({"cell": result["group"], "model": result["config"]["model"], "norm": result["config"]["norm"],
                     "seed": result["config"]["seed"], "final_train_loss": "" if train_loss is None else round(train_loss, 4),
                     "val_minus_train": "" if train_loss is None or val != val else round(val - train_loss, 4),
                     **trace_row(result, result["config"]["clip_norm"])})  # fmt: skip
    write_csv(out_dir / "results.csv", rows)
    for model in bases:
        chosen = [r for r in results if r["config"]["model"] == model]
        plot_traces(chosen, out_dir / f"loss_{model}.png", field="losses", log_scale=False,
                    ylabel=f"training loss ({model})", label=lambda r: r["config"]["norm"])  # fmt: skip
    write_report(out_dir / "report.md", bases, rows, seeds, setting.unigram, plan)
    return rows


def final_training_loss(losses: list[float], steps: int = FINAL_STEPS) -> float | None:
    """The mean training-mode loss of the last ``steps`` optimizer steps (None: no step ran)."""
    tail = losses[-steps:]
    return sum(tail) / len(tail) if tail else None


def write_report(path: Path, bases: dict[str, Any], rows: list[dict[str, Any]], seeds: Sequence[int], unigram: float,
                 plan: dict[str, Any]) -> None:  # fmt: skip
    table = summary_table(rows, "cell", ("final_train_loss", "val_loss", "val_minus_train", "diverged", "max_grad_norm"))
    transformer = bases["transformer"]
    models = "; ".join(f"{name}: {describe_model(config)}, lr {config.lr:g}" for name, config in bases.items())
    text = f"""# Norm comparison for sequence models

`{transformer.data_file}`, {transformer.tokenizer} tokenizer, block {transformer.block_size}, batch
{transformer.batch_size}, {plan['steps']} optimizer steps of the text recipe (warmup, cosine, clipping at
{transformer.clip_norm}), {transformer.precision}, seeds {list(seeds)}. {models} (the Transformer pre-norm, the
LSTM's norm on its outputs).

`final_train_loss`: the mean loss of the last {FINAL_STEPS} training steps (training mode: BatchNorm normalises
with the batch's own statistics, over every position of every window); `val_loss`: the whole validation
split in evaluation mode (BatchNorm uses its running averages). `val_minus_train`: their difference. `diverged`: NaN/inf, or a final
validation loss no better than the unigram entropy ({unigram:.3f} nats).

{table}

{{plots}}

Per-run rows: `results.csv`; per-run outputs: `runs/<cell>/`.
"""
    path.write_text(text.replace("{plots}", "\n".join(f"![{m} loss](loss_{m}.png)" for m in bases)))
