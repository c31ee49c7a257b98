"""Callback hooks and the narrow view of the trainer they get.

The training loop lives in one place (``trainkit.trainer``). Extensions hook into it at
six named points and see only a ``TrainState``: the model, counters, the history and
the latest metrics, plus one action, ``request_stop``. They cannot reach the optimizer
or the loop's internals, so a callback cannot silently change how training works.

Hook order per epoch::

    on_fit_start
      on_epoch_start -> on_batch_end (per optimizer step) -> on_validation_end -> on_epoch_end
    on_fit_end
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainkit.errors import ConfigError


@dataclass
class TrainState:
    """What a callback may read (and the one thing it may do: ask training to stop).

    ``epoch`` counts from 1 and is the epoch in progress (0 before the first); ``global_step`` counts
    optimizer steps; ``metrics`` holds the current epoch's values once validation ran
    (the same dict that is appended to ``history``).
    """

    model: nn.Module
    epoch: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    stop_requested: bool = False
    stop_reason: str = ""

    def request_stop(self, reason: str) -> None:
        """Stop after the current epoch (its checkpoint is still written)."""
        self.stop_requested = True
        self.stop_reason = reason


class Callback:
    """Base class: override the hooks you need. State is saved in checkpoints via state_dict."""

    def on_fit_start(self, state: TrainState) -> None: ...

    def on_epoch_start(self, state: TrainState) -> None: ...

    def on_batch_end(self, state: TrainState, loss: torch.Tensor) -> None:
        """Called after each optimizer step with the step's loss as a detached tensor.

        Calling ``loss.item()`` here forces a device sync on every step; avoid it on GPU.
        """

    def on_validation_end(self, state: TrainState) -> None: ...

    def on_epoch_end(self, state: TrainState) -> None: ...

    def on_fit_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def clone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A snapshot of the weights that later training cannot overwrite.

    ``model.state_dict().copy()`` is a shallow copy: its tensors alias the live
    parameters, which the optimizer updates in place. Cloning each tensor is required.
    """
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def is_improvement(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (NaN never improves)."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class EarlyStopping(Callback):
    """Stop when a monitored metric stops improving; optionally restore the best weights.

    ``baseline``: the metric must beat this value to count as an improvement at all.
    ``start_from_epoch``: the first this-many epochs neither improve nor count towards
    patience, so a warmup phase cannot trigger a stop.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "min",
        patience: int = 5,
        min_delta: float = 0.0,
        baseline: float | None = None,
        start_from_epoch: int = 0,
        restore_best: bool = True,
    ) -> None:
        if mode not in ("min", "max"):
            raise ConfigError(f"EarlyStopping mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ConfigError(f"EarlyStopping patience must be >= 1, got {patience}")
        if min_delta < 0:
            raise ConfigError(f"EarlyStopping min_delta must be >= 0, got {min_delta}")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.baseline = baseline
        self.start_from_epoch = start_from_epoch
        self.restore_best = restore_best
        self.best: float = baseline if baseline is not None else (math.inf if mode == "min" else -math.inf)
        self.best_epoch: int | None = None
        self.wait = 0
        self.best_weights: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, state: TrainState) -> None:
        if state.epoch <= self.start_from_epoch:
            return
        if self.monitor not in state.metrics:
            raise ConfigError(
                f"early stopping monitors {self.monitor!r}, which is not in the history; "
                f"available: {', '.join(sorted(state.metrics))}"
            )
        value = state.metrics[self.monitor]
        if is_improvement(value, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch, self.wait = value, state.epoch, 0
            if self.restore_best:
                self.best_weights = clone_state_dict(state.model)
            return
        self.wait += 1
        if self.wait >= self.patience:
            state.request_stop(
                f"early stopping: {self.monitor} has not improved for {self.patience} epochs "
                f"(best {self.best:.6g} at epoch {self.best_epoch})"
            )

    def on_fit_end(self, state: TrainState) -> None:
        if self.restore_best and self.best_weights is not None:
            state.model.load_state_dict(self.best_weights)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.wait = state["wait"]
        self.best_weights = state["best_weights"]
