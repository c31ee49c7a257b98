"""Per-epoch metrics: accumulated on the device, written to history.csv as training goes."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch

from trainkit import distributed
from trainkit.errors import CheckpointError
from trainkit.tasks.metrics import MetricSet

# The columns every run has, in this order; the task's metrics follow train_loss / val_loss, and
# any value a callback adds to the epoch's metrics comes after them (history.csv keeps all).
LOOP_COLUMNS = ("lr", "grad_norm", "clip_fraction", "skipped_steps", "epoch_seconds", "samples_per_second")
# overflowed: steps fp16's GradScaler skipped (history column scaler_skipped_steps, fp16 runs only)
SUMS = ("loss_sum", "grad_norm_sum", "clipped", "overflowed")


class EpochMeter:
    """Running sums kept as device tensors and read back once per epoch (no per-step sync).

    The loss is summed weighted by each step's sample count (rows, elements or tokens: the
    task's ``samples``), the task's metrics by their own rules (trainkit.tasks.metrics). Its state
    goes into mid-epoch checkpoints, so a resumed epoch reports the same metrics as an
    uninterrupted one. ``scaled``: an fp16 run, whose GradScaler skips steps that overflowed;
    the gradient norm and clip fraction average over the other steps (trainkit.precision).
    """

    def __init__(self, device: torch.device, metrics: MetricSet, *, scaled: bool = False) -> None:
        for name in SUMS:
            setattr(self, name, torch.zeros((), device=device, dtype=torch.float64))
        self.device = device
        self.metrics = metrics
        self.scaled = scaled
        self.weight: float | torch.Tensor = 0  # samples the loss averages over, on this rank
        self.rows = 0  # batch rows on this rank (throughput is reported in rows per second)
        self.total_rows = 0.0  # over all ranks, set by results()
        self.steps = 0
        self.skipped = 0

    def add_step(
        self, mean_loss: torch.Tensor, loss_weight: float | torch.Tensor, weight: float | torch.Tensor, rows: int,
        grad_norm: torch.Tensor, clipped: torch.Tensor, overflowed: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        """One in-place add per sum (each tiny op costs microseconds per step on a CPU). ``grad_norm``
        and ``clipped`` of an ``overflowed`` step are already masked to 0 (trainkit.precision)."""
        if isinstance(loss_weight, torch.Tensor):
            self.loss_sum += mean_loss * loss_weight
        else:
            self.loss_sum.add_(mean_loss, alpha=loss_weight)
        self.weight = self.weight + weight
        self.rows += rows
        self.grad_norm_sum += grad_norm
        self.clipped += clipped
        if overflowed is not None:
            self.overflowed += overflowed
        self.steps += 1

    def results(self) -> dict[str, float]:
        """The epoch's metrics; under DDP the loss and metric sums and the sample counts are
        all-reduced here, once per epoch, so every rank reports the whole epoch. (The gradient
        norm, clip and skip counts are the same on every rank: gradients are averaged before clipping.)"""
        weight = self.weight if isinstance(self.weight, torch.Tensor) else self.loss_sum.new_tensor(float(self.weight))
        sums = torch.stack([self.loss_sum, weight.to(self.loss_sum), self.loss_sum.new_tensor(float(self.rows))])
        loss_sum, weight_total, self.total_rows = distributed.all_reduce_sum(sums).tolist()
        metrics = self.metrics.results(distributed.all_reduce_sum, device=self.device)
        grad_norm_sum, clipped, overflowed = torch.stack([self.grad_norm_sum, self.clipped, self.overflowed]).tolist()
        updated = self.steps - overflowed  # steps the optimizer really took
        results = {
            "train_loss": _mean(loss_sum, weight_total),
            **{f"train_{name}": value for name, value in metrics.items()},
            "grad_norm": _mean(grad_norm_sum, updated),
            "clip_fraction": _mean(clipped, updated),
            "skipped_steps": self.skipped,
        }
        if self.scaled:
            results["scaler_skipped_steps"] = int(overflowed)
        return results

    def state_dict(self) -> dict[str, Any]:
        weight = self.weight.detach().cpu() if isinstance(self.weight, torch.Tensor) else self.weight
        return {
            **{name: getattr(self, name).clone() for name in SUMS},
            "weight": weight,
            "rows": self.rows,
            "steps": self.steps,
            "skipped": self.skipped,
            "metrics": self.metrics.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in SUMS:
            getattr(self, name).copy_(torch.as_tensor(state.get(name, 0.0)))  # (older checkpoints have no overflowed)
        weight = state["weight"]
        self.weight = weight.to(self.device) if isinstance(weight, torch.Tensor) else weight
        self.rows, self.steps, self.skipped = state["rows"], state["steps"], state["skipped"]
        self.metrics.load_state_dict(state["metrics"])


def merged_meter_state(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Several ranks' running sums as one meter's (a mid-epoch resume on another world size): the
    loss, sample weight, rows and metric sums added; the per-step values every rank shares (gradient
    norm, clip and skip counts: gradients are averaged before clipping) taken once."""
    merged = dict(states[0])
    merged["loss_sum"] = sum(state["loss_sum"] for state in states)
    merged["weight"] = sum(state["weight"] for state in states)
    merged["rows"] = sum(state["rows"] for state in states)
    merged["metrics"] = {name: merged_metric_sums(name, [state["metrics"][name] for state in states])
                         for name in states[0]["metrics"]}  # fmt: skip
    return merged


def merged_metric_sums(name: str, sums: list[Any]) -> Any:
    if all(isinstance(value, torch.Tensor) for value in sums):
        return sum(sums)
    raise CheckpointError(f"metric {name!r} (torchmetrics) keeps running state that cannot be split across another "
                          f"number of processes; resume this mid-epoch checkpoint with the same number, or from an "
                          f"epoch's end")  # fmt: skip


def _mean(total: float, count: float) -> float:
    """NaN when nothing was counted (every step skipped): 0/0 must not read as a perfect loss."""
    return total / count if count else math.nan


class HistoryFile:
    """history.csv: rewritten from the checkpoint's rows on (re)start, then one row per epoch.

    The header is every column any row has, in first-seen order: a metric that appears later
    (a callback's) rewrites the file with the new column instead of being dropped.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.columns: list[str] = []

    def rewrite(self, rows: list[dict[str, float]]) -> None:
        if self.path is None:
            return
        self.columns = columns_of(rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, float], rows: list[dict[str, float]]) -> None:
        """Add ``row`` (the last of ``rows``); a new column rewrites the file from ``rows``."""
        if self.path is None:
            return
        if not self.columns or any(key not in self.columns for key in row):
            self.rewrite(rows)
            return
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns).writerow(row)


def columns_of(rows: list[dict[str, float]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


# Shorter names for the epoch log line (history.csv keeps the full names).
SHORT_NAMES = {"accuracy": "acc"}


def format_epoch(m: dict[str, float], epochs: int | None) -> str:
    """One log line per epoch (or validation point): losses and metrics, lr, gradient norm, speed."""
    step = f" step {m['step']}" if "step" in m else ""
    of = f"/{epochs}" if epochs else ""
    measured = "  ".join(
        " ".join(f"{_short(key)} {_number(value)}" for key, value in m.items() if key.startswith(prefix))
        for prefix in ("train_", "val_") if any(key.startswith(prefix) for key in m)
    )  # fmt: skip
    skipped = f" skipped {m['skipped_steps']}" if m.get("skipped_steps") else ""
    skipped += f" scaler-skipped {m['scaler_skipped_steps']}" if m.get("scaler_skipped_steps") else ""
    return (
        f"epoch {m['epoch']}{of}{step}  {measured}"
        f"  lr {m['lr']:.2e}  grad_norm {m['grad_norm']:.3f} clipped {100 * m['clip_fraction']:.0f}%{skipped}"
        f"  {m['epoch_seconds']:.1f}s ({m['samples_per_second']:.0f} samples/s)"
    )


def _number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)  # a callback may log anything


def _short(key: str) -> str:
    prefix, _, name = key.partition("_")
    return f"{prefix}_{SHORT_NAMES.get(name, name)}"
