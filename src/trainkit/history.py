"""Per-epoch metrics: accumulated on the device, written to history.csv as training goes."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch

from trainkit import distributed

HISTORY_FIELDS = (
    "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
    "grad_norm", "clip_fraction", "skipped_steps", "epoch_seconds", "samples_per_second",
)  # fmt: skip
SUMS = ("loss_sum", "correct", "grad_norm_sum", "clipped")


class EpochMeter:
    """Running sums kept as device tensors and read back once per epoch (no per-step sync).

    Its state goes into mid-epoch checkpoints, so a resumed epoch reports the same
    metrics as an uninterrupted one.
    """

    def __init__(self, device: torch.device) -> None:
        for name in SUMS:
            setattr(self, name, torch.zeros((), device=device, dtype=torch.float64))
        self.samples = 0  # on this rank
        self.total_samples = 0.0  # over all ranks, set by results()
        self.steps = 0
        self.skipped = 0

    def add_step(
        self, mean_loss: torch.Tensor, loss_weight: float, correct: torch.Tensor, samples: int,
        grad_norm: torch.Tensor, clipped: torch.Tensor,
    ) -> None:
        """One in-place add per sum (each tiny op costs microseconds per step on a CPU)."""
        self.loss_sum.add_(mean_loss, alpha=loss_weight)
        self.correct += correct
        self.samples += samples
        self.grad_norm_sum += grad_norm
        self.clipped += clipped
        self.steps += 1

    def results(self) -> dict[str, float]:
        """The epoch's metrics; under DDP the loss/accuracy sums and sample counts are all-reduced
        here, once per epoch, so every rank reports the whole epoch. (The gradient norm, clip and
        skip counts are the same on every rank: gradients are averaged before clipping.)"""
        sums = torch.stack([self.loss_sum, self.correct, self.correct.new_tensor(float(self.samples))])
        loss_sum, correct, self.total_samples = distributed.all_reduce_sum(sums).tolist()
        return {
            "train_loss": _mean(loss_sum, self.total_samples),
            "train_accuracy": _mean(correct, self.total_samples),
            "grad_norm": _mean(self.grad_norm_sum.item(), self.steps),
            "clip_fraction": _mean(self.clipped.item(), self.steps),
            "skipped_steps": self.skipped,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **{name: getattr(self, name).clone() for name in SUMS},
            "samples": self.samples,
            "steps": self.steps,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in SUMS:
            getattr(self, name).copy_(state[name])
        self.samples, self.steps, self.skipped = state["samples"], state["steps"], state["skipped"]


def _mean(total: float, count: float) -> float:
    """NaN when nothing was counted (every step skipped): 0/0 must not read as a perfect loss."""
    return total / count if count else math.nan


class HistoryFile:
    """history.csv: rewritten from the checkpoint's rows on (re)start, then one row per epoch."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def rewrite(self, rows: list[dict[str, float]]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, float]) -> None:
        if self.path is None:
            return
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=HISTORY_FIELDS, extrasaction="ignore").writerow(row)


def format_epoch(m: dict[str, float], epochs: int) -> str:
    val = f" val_loss {m['val_loss']:.4f} val_acc {m['val_accuracy']:.4f}" if "val_loss" in m else ""
    skipped = f" skipped {m['skipped_steps']}" if m.get("skipped_steps") else ""
    return (
        f"epoch {m['epoch']}/{epochs}  train_loss {m['train_loss']:.4f} train_acc {m['train_accuracy']:.4f}{val}"
        f"  lr {m['lr']:.2e}  grad_norm {m['grad_norm']:.3f} clipped {100 * m['clip_fraction']:.0f}%{skipped}"
        f"  {m['epoch_seconds']:.1f}s ({m['samples_per_second']:.0f} samples/s)"
    )
