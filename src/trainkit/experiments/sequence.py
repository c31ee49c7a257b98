"""What the sequence-model comparisons share: the text run they vary, per-step traces, spikes
and divergence, and the loss / gradient-norm plots.

Each cell is an ordinary ``--dataset text`` run (the text recipe, a smaller budget) with a
``StepTrace`` callback that keeps every optimizer step's loss and pre-clip gradient norm on
the device and reads them once at the end (no per-step sync). A run whose loss turns NaN/inf
is recorded as diverged (the NaN policy raises), so is one whose final validation loss is no
better than the unigram entropy of the training text: a model that learned nothing from context.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainkit.loop.callbacks import Callback, TrainState
from trainkit.config.files import recipe_config
from trainkit.config.schema import TrainConfig
from trainkit.errors import ConfigError, NonFiniteLossError
from trainkit.experiments.core import Cell, finish_plot, read_history, run_cells
from trainkit.tracking.plots import plt
from trainkit.recipes.run import train_run
from trainkit.recipes.text.data import read_text

log = logging.getLogger("trainkit")

SPIKE_FACTOR = 5.0  # a gradient-norm spike: a step whose pre-clip norm exceeds 5x the run's median
QUICK_CHARACTERS = 40_000  # --quick trains on the start of the text only
QUICK_MODEL = {"layers": 2, "heads": 2, "width": 32, "block_size": 32, "batch_size": 8}


def default_text_file(data_file: str | None) -> str:
    """--data-file, else the KJV text under $TRAINKIT_DATA_DIR (where CI and the Makefile put it)."""
    if data_file is not None:
        return data_file
    shared = Path(os.environ.get("TRAINKIT_DATA_DIR", "")) / "text" / "kjv.txt"
    if os.environ.get("TRAINKIT_DATA_DIR") and shared.is_file():
        return str(shared)
    raise ConfigError("this comparison trains on text: pass --data-file FILE (e.g. ../shared/datasets/text/kjv.txt)")


def text_base_config(out_dir: Path, data_file: str | None, *, quick: bool, steps: int, **settings: Any) -> TrainConfig:
    """The text recipe at ``steps`` optimizer steps; --quick: a tiny model on the text's start."""
    path = default_text_file(data_file)
    if quick:
        trimmed = out_dir / "quick-text.txt"
        out_dir.mkdir(parents=True, exist_ok=True)
        trimmed.write_text(read_text(path)[:QUICK_CHARACTERS], encoding="utf-8")
        path, settings = str(trimmed), {**QUICK_MODEL, **settings}
    values = {"dataset": "text", "data_file": path, "max_steps": steps, "device": "cpu", **settings}
    return recipe_config(values, source="the comparison's settings").resolved()


def unigram_entropy(config: TrainConfig) -> float:
    """Nats per character of the training text's character frequencies: the loss of a model
    that ignores context (char tokenizer; other tokenizers count characters too, as a reference)."""
    text = read_text(config.data_file)
    train = text[: round(len(text) * (1 - config.val_fraction))]
    total = len(train)
    return -sum(n / total * math.log(n / total) for n in Counter(train).values())


@dataclass
class TextComparison:
    """A sequence comparison's setting: its plan (full or --quick), seeds, the base run of each
    model it trains, and the unigram entropy that separates learning from divergence."""

    out_dir: Path
    plan: dict[str, Any]
    seeds: tuple[int, ...]
    bases: dict[str, TrainConfig]
    unigram: float

    def run(self, cells: Sequence[Cell], runner: Callable[..., dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Every cell through ``runner(cell, out_dir, unigram)`` (default run_traced_cell), cached."""
        runner = runner or run_traced_cell
        return run_cells(cells, self.out_dir, lambda cell: runner(cell, self.out_dir, self.unigram))


def setup_comparison(
    out_dir: str | Path, *, quick: bool, seeds: Sequence[int] | None, data_file: str | None, full: dict[str, Any],
    quick_plan: dict[str, Any],
) -> TextComparison:  # fmt: skip
    """The plan's models (``plan["models"]``, default the Transformer) on the text recipe."""
    out_dir = Path(out_dir)
    plan = quick_plan if quick else full
    models = plan.get("models", ("transformer",))
    bases = {model: text_base_config(out_dir, data_file, quick=quick, steps=plan["steps"], model=model) for model in models}
    first = next(iter(bases.values()))
    return TextComparison(out_dir, plan, tuple(seeds or plan["seeds"]), bases, unigram_entropy(first))


class StepTrace(Callback):
    """Every optimizer step's loss and pre-clip gradient norm, kept on the device until the end."""

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._norms: list[torch.Tensor] = []
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def on_before_optimizer_step(self, state: TrainState, grad_norm: torch.Tensor) -> None:
        self._norms.append(grad_norm.detach().float())

    def on_batch_end(self, state: TrainState, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach().float())

    def on_fit_end(self, state: TrainState) -> None:
        self.read()

    def read(self) -> None:
        """Move the trace to plain floats (also after a run that raised)."""
        if self._losses:
            self.losses = torch.stack(self._losses).tolist()
        if self._norms:
            self.grad_norms = torch.stack(self._norms).tolist()


def run_traced_cell(cell: Cell, out_dir: Path, unigram: float) -> dict[str, Any]:
    """Train one cell with a StepTrace; a NaN/inf loss or a loss no better than ``unigram`` is a divergence."""
    run_dir = out_dir / "runs" / cell.key
    if run_dir.exists():
        shutil.rmtree(run_dir)
    trace = StepTrace()
    summary, history, nonfinite = None, [], False
    try:
        summary = train_run(dataclasses.replace(cell.config, out=str(run_dir)), extra_callbacks=[trace])
        history = read_history(run_dir / "history.csv")
    except NonFiniteLossError as error:
        log.warning("%s diverged: %s", cell.key, error)
        trace.read()
        nonfinite = True
    val_loss = summary["val_loss"] if summary else math.nan
    return {
        "summary": summary, "history": history, "losses": trace.losses, "grad_norms": trace.grad_norms,
        "val_loss": val_loss, "nonfinite": nonfinite,
        "diverged": nonfinite or not val_loss < unigram,
    }  # fmt: skip


def spike_count(grad_norms: list[float]) -> int:
    """Steps whose pre-clip gradient norm exceeds SPIKE_FACTOR x the run's median (non-finite included)."""
    finite = [g for g in grad_norms if math.isfinite(g)]
    if not finite:
        return len(grad_norms)
    threshold = SPIKE_FACTOR * statistics.median(finite)
    return sum(1 for g in grad_norms if not g <= threshold)


def trace_row(result: dict[str, Any], clip_norm: float | None) -> dict[str, Any]:
    """The per-run figures every sequence comparison reports."""
    norms = result["grad_norms"]
    finite = [g for g in norms if math.isfinite(g)]
    clipped = sum(1 for g in norms if clip_norm is not None and not g <= clip_norm)
    return {
        "val_loss": "" if math.isnan(result["val_loss"]) else round(result["val_loss"], 4),
        "diverged": int(result["diverged"]),
        "nonfinite": int(result["nonfinite"]),
        "max_grad_norm": round(max(finite), 3) if finite else "",
        "grad_norm_spikes": spike_count(norms),
        "clipped_fraction": round(clipped / len(norms), 3) if norms else "",
        "steps_run": len(result["losses"]),
    }


def smoothed(values: list[float], window: int = 25) -> list[float]:
    """A trailing mean, so that curves of noisy per-step losses can be told apart."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def plot_traces(results: list[dict[str, Any]], path: Path, *, field: str, ylabel: str, log_scale: bool,
                label: Any) -> None:  # fmt: skip
    """One line per cell (the first seed of each group): smoothed per-step ``field``."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    seen: set[str] = set()
    for result in results:
        if result["group"] in seen or not result[field]:
            continue
        seen.add(result["group"])
        values = [v if math.isfinite(v) else float("nan") for v in result[field]]
        ax.plot(range(1, len(values) + 1), smoothed(values), label=label(result), linewidth=1)
    if log_scale:
        ax.set_yscale("log")
    finish_plot(fig, ax, path, xlabel="optimizer step", ylabel=ylabel)
