"""Callback hooks and the narrow view of the trainer they get.

The training loop lives in one place (``trainkit.loop.trainer``). Extensions hook into it at
seven named points and see only a ``TrainState``: the model, counters, the history, the
latest metrics and the last micro-batch's (detached) outputs, plus one action,
``request_stop`` (at the epoch's end, or now). They cannot reach the optimizer or the loop's
internals, so a callback cannot silently change how training works.

Hook order per epoch::

    on_fit_start
      on_epoch_start
        per optimizer step: on_before_optimizer_step (gradient norm) -> on_batch_end (loss)
        on_validation_end (also at each --val-every-steps point) -> on_epoch_end
    on_fit_end

A callback's checkpoint state is stored under its ``state_key`` (numbered when two share one),
so two EarlyStopping callbacks on different metrics keep their own state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    (the same dict that is appended to ``history``: what a callback adds to it in
    ``on_validation_end``/``on_epoch_end`` is written to history.csv too). ``step_output`` is
    the last counted micro-batch's ``StepOutput`` (loss, outputs, targets), detached from the graph.
    ``eval_model`` is what validation measures: the weight average under ``--ema``, else ``model``.
    ``lr`` is the (first parameter group's) learning rate of the optimizer step in progress.
    """

    model: nn.Module
    eval_model: nn.Module | None = None
    epoch: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    stop_requested: bool = False
    stop_reason: str = ""
    stop_now: bool = False
    step_output: Any = None
    lr: float = 0.0

    def request_stop(self, reason: str, *, now: bool = False) -> None:
        """Stop after the current epoch, or with ``now`` after the current optimizer step (the
        epoch then ends early: its metrics, validation and checkpoint are still written)."""
        self.stop_requested = True
        self.stop_reason = reason
        self.stop_now = self.stop_now or now


class Callback:
    """Base class: override the hooks you need. State is saved in checkpoints via state_dict.

    ``adds_metrics``: names this callback writes into ``state.metrics`` (so --monitor may use them).
    """

    adds_metrics: tuple[str, ...] = ()

    @property
    def state_key(self) -> str:
        """Where this callback's state lives in a checkpoint; stable across runs of the same setup."""
        return type(self).__qualname__

    def on_fit_start(self, state: TrainState) -> None: ...

    def on_epoch_start(self, state: TrainState) -> None: ...

    def on_before_optimizer_step(self, state: TrainState, grad_norm: torch.Tensor) -> None:
        """Called before each optimizer step with the gradient norm before clipping (a device tensor)."""

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


# Metrics that improve downwards / upwards, for EarlyStopping(mode="auto") (by name, prefix removed).
LOWER_IS_BETTER = ("loss", "mse", "mae", "perplexity", "error", "grad_norm", "clip_fraction")
HIGHER_IS_BETTER = ("accuracy", "acc", "f1", "r2", "exact_match", "auc", "precision", "recall")


def monitor_direction(monitor: str) -> str:
    """'min' or 'max' for a metric name such as val_loss or val_top5_accuracy; a one-line error when unknown."""
    name = monitor.removeprefix("val_").removeprefix("train_")
    if any(name == n or name.endswith("_" + n) for n in LOWER_IS_BETTER):
        return "min"
    if any(name == n or name.endswith("_" + n) for n in HIGHER_IS_BETTER):
        return "max"
    raise ConfigError(f"cannot tell whether {monitor!r} should go up or down: pass mode='min' or mode='max'")


class EarlyStopping(Callback):
    """Stop when a monitored metric stops improving; restore the best weights at the end.

    Keras 3 semantics (keras/src/callbacks/early_stopping.py): every monitored validation adds one
    to ``wait``; an improvement on the best value so far (by more than ``min_delta``) records the
    best weights and resets ``wait`` only when it also beats ``baseline``; training stops when
    ``wait`` reaches ``patience`` on a validation that did not improve. The first
    ``start_from_epoch`` epochs are not monitored at all (a warmup phase cannot stop a run).
    ``mode="auto"`` reads the direction from the metric's name. Decides at ``on_validation_end``,
    so with ``--val-every-steps`` patience counts validations.

    A NaN/inf value counts towards patience like a validation without improvement (a run whose
    validation gives NaN should not use up its whole budget), but it never becomes the best: its
    weights are never kept or restored, ``best_epoch`` stays None until a finite value, and the
    stop reason says how many were non-finite (Keras keeps the first epoch's weights whatever
    its value, which reported a NaN epoch as the best).
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "auto",
        patience: int = 5,
        min_delta: float = 0.0,
        baseline: float | None = None,
        start_from_epoch: int = 0,
        restore_best_weights: bool = True,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(f"EarlyStopping monitor must be a metric name such as 'val_loss', got {monitor!r}")
        if mode not in ("auto", "min", "max"):
            raise ConfigError(f"EarlyStopping mode must be 'auto', 'min' or 'max', got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ConfigError(f"EarlyStopping patience must be an integer >= 0, got {patience!r}")
        if min_delta < 0:
            raise ConfigError(f"EarlyStopping min_delta must be >= 0, got {min_delta}")
        self.monitor = monitor
        self.mode = monitor_direction(monitor) if mode == "auto" else mode
        self.patience = patience
        self.min_delta = min_delta
        self.baseline = baseline
        self.start_from_epoch = start_from_epoch
        self.restore_best_weights = restore_best_weights
        self.best: float = math.inf if self.mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.wait = 0
        self.nonfinite = 0  # of the validations counted in ``wait``, those whose value was NaN/inf
        self.best_weights: dict[str, torch.Tensor] | None = None

    @property
    def state_key(self) -> str:
        return f"EarlyStopping[{self.monitor}]"

    def on_validation_end(self, state: TrainState) -> None:
        if state.epoch <= self.start_from_epoch:
            return
        if self.monitor not in state.metrics:
            raise ConfigError(
                f"early stopping monitors {self.monitor!r}, which is not in the history; "
                f"available: {', '.join(sorted(state.metrics))}"
            )
        value = state.metrics[self.monitor]
        measured = state.eval_model if state.eval_model is not None else state.model  # the weights behind `value`
        self.wait += 1
        if is_improvement(value, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch = value, state.epoch
            if self.restore_best_weights:
                self.best_weights = clone_state_dict(measured)
            if self.baseline is None or is_improvement(value, self.baseline, self.mode, self.min_delta):
                self.wait = self.nonfinite = 0
            return
        self.nonfinite += not math.isfinite(value)
        if self.wait >= self.patience:
            state.request_stop(self.stop_reason())

    def stop_reason(self) -> str:
        """Why training stops; never names a best epoch that was not validated to a finite value."""
        nonfinite = f", {self.nonfinite} of them non-finite" if self.nonfinite else ""
        best = (f"best {self.best:.6g} at epoch {self.best_epoch}" if self.best_epoch is not None
                else f"no validation gave a finite {self.monitor}")  # fmt: skip
        return f"early stopping: {self.monitor} has not improved for {self.wait} validations{nonfinite} ({best})"

    def on_fit_end(self, state: TrainState) -> None:
        """The best validation's weights (the EMA's under --ema) become the model's."""
        if self.restore_best_weights and self.best_weights is not None:
            state.model.load_state_dict(self.best_weights)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "nonfinite": self.nonfinite,
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.wait = state["wait"]
        self.nonfinite = state.get("nonfinite", 0)  # absent from checkpoints written before it was counted
        self.best_weights = state["best_weights"]


def callback_keys(callbacks: Sequence[Callback]) -> list[str]:
    """Each callback's key for its checkpoint state: its ``state_key``, numbered when two share one
    (two EarlyStopping on the same metric), so no two callbacks overwrite each other's state."""
    keys: list[str] = []
    for callback in callbacks:
        key = callback.state_key
        keys.append(key if key not in keys else f"{key}#{sum(k.split('#')[0] == key for k in keys) + 1}")
    return keys


def check_callbacks(callbacks: Sequence[Any]) -> None:
    for callback in callbacks:
        if not isinstance(callback, Callback):
            raise ConfigError(f"callbacks must be trainkit.Callback instances, got {type(callback).__name__}")
