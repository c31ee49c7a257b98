"""The learning-rate range test ("LR finder"), leaving no trace on the model or optimizer.

``lr_find`` raises the learning rate step by step from ``start_lr`` to ``end_lr`` while
training, records the loss, and suggests a learning rate from the resulting curve. The
learning rate that trains fastest sits where the loss still falls steeply, well before it
blows up.

No trace
    The sweep trains the real model with the real optimizer, so afterwards it puts back
    everything it touched: parameters and buffers (BatchNorm running statistics and
    ``num_batches_tracked``) bit for bit, each module's train/eval flag, the optimizer's
    state and param groups (lr included), and every RNG (torch CPU, the model's CUDA device,
    Python ``random``, NumPy's global). A training run after ``lr_find`` is therefore
    bit-identical to one without it. The restore happens in ``finally``, so it also runs
    when the sweep raises. Gradients are the one exception: they are left as ``None``
    (``zero_grad(set_to_none=True)``), because every training step starts by clearing them.
    An LR scheduler attached to the optimizer is never stepped, and restoring the
    optimizer's param groups restores the lrs it set.

Suggestions (computed on the smoothed curve; after an early stop the last few points,
which show the divergence rather than the useful range, are ignored)
    ``steepest``        the lr where the smoothed loss falls fastest per decade of lr
                        (most negative ``np.gradient`` w.r.t. log10(lr)), skipping the
                        noisy first 10% of points; the classic recipe.
    ``minimum_div_10``  the lr of the lowest smoothed loss, divided by 10: the minimum
                        itself is already too close to divergence (Smith's rule).
    ``between``         the geometric mean of ``steepest`` and ``minimum_div_10``: halfway
                        between them on the log axis (the default pick, see
                        ``lr_find(rule=...)``; measured on five tasks in docs/lr_finder.md,
                        where each of the two alone misses on some).
    ``valley``          fastai's rule: the longest valley is the longest
                        decreasing subsequence of the smoothed loss; the suggestion is the
                        point in the middle of its middle third (index
                        ``start + int(span / 3) + int(span / 6)``, i.e. about halfway down).
    Each falls back to ``minimum_div_10`` on a curve too short or too flat to apply it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trainkit.devices import module_device, restore_rng, rng_state
from trainkit.errors import ConfigError, TrainkitError
from trainkit.tracking.plots import pyplot
from trainkit.precision import autocast_dtype
from trainkit.data.runtime import to_device
from trainkit.tasks.base import Task


__all__ = [
    "LRFinderResult",
    "lr_find",
    "smooth_losses",
    "suggest_lrs",
    "suggest_minimum_div_10",
    "suggest_steepest",
    "suggest_valley",
    "sweep_lrs",
]

Batch = tuple[Tensor, Tensor]

MODES = ("exp", "linear")
PRECISIONS = ("fp32", "bf16", "fp16")
MIN_POINTS = 5  # fewer recorded points than this after a divergence: the sweep started too high
SKIP_END = 5  # points dropped from the end of a diverged curve before suggesting
SKIP_START_FRACTION = 0.1  # share of the first points that `steepest` ignores (EMA still settling)


# ---------------------------------------------------------------------------------- result


@dataclass
class LRFinderResult:
    """The recorded sweep and the learning rates suggested from it."""

    lrs: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    suggestions: dict[str, float]
    suggested_lr: float
    stopped_early: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain Python numbers only, so ``json.dumps`` accepts it."""
        data = asdict(self)
        for key in ("lrs", "losses", "smoothed_losses"):
            data[key] = [float(v) for v in data[key]]
        data["suggestions"] = {name: float(lr) for name, lr in data["suggestions"].items()}
        data["suggested_lr"] = float(data["suggested_lr"])
        data["stopped_early"] = bool(data["stopped_early"])
        return data

    def plot(self, path: str | Path) -> Path:
        """Write loss vs lr (log x-axis) with a marker per suggestion as a PNG; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(self.lrs, self.losses, color="tab:blue", alpha=0.25, linewidth=1, label="loss")
        ax.plot(self.lrs, self.smoothed_losses, color="tab:blue", linewidth=2, label="smoothed loss")
        for (name, lr), color in zip(self.suggestions.items(), ("tab:red", "tab:orange", "tab:green")):
            ax.plot([lr], [self._smoothed_loss_at(lr)], marker="o", markersize=8, linestyle="none",
                    color=color, label=f"{name}: {lr:.2e}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_ylim(*self._useful_loss_range())
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        title = "LR range test" + (" (stopped early: loss diverged)" if self.stopped_early else "")
        ax.set_title(f"{title}; suggested lr {self.suggested_lr:.2e}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def _useful_loss_range(self) -> tuple[float, float]:
        """Y-limits from the lowest loss to a little above the start, so a divergent spike does not
        flatten the interesting part of the curve into a line."""
        lowest = min(min(self.losses), min(self.smoothed_losses))
        before_minimum = self.smoothed_losses[: int(np.argmin(self.smoothed_losses)) + 1]
        top = max(before_minimum)
        margin = 0.1 * (top - lowest) or 0.1 * abs(top) or 1.0
        return lowest - margin, top + 2 * margin

    def _smoothed_loss_at(self, lr: float) -> float:
        """The smoothed curve interpolated in log10(lr), to place a suggestion's marker on it."""
        return float(np.interp(math.log10(lr), np.log10(self.lrs), self.smoothed_losses))


# ------------------------------------------------------------------------------ the sweep

SUGGESTION_RULES = ("between", "minimum_div_10", "steepest", "valley")
DEFAULT_RULE = "between"  # docs/lr_finder.md, "Across tasks": the only rule near the grid's best on every task


def lr_find(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | Task,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    mode: str = "exp",
    smooth: float = 0.98,
    diverge_factor: float = 4.0,
    accumulate: int = 1,
    precision: str = "fp32",
    device: torch.device | str | None = None,
    rule: str = DEFAULT_RULE,
) -> LRFinderResult:
    """Run the LR range test and suggest a learning rate; the model and optimizer end as they began.

    ``rule`` picks ``suggested_lr`` among the suggestions (see the module docstring; the default
    is the one measured closest to a grid search's best lr across tasks, docs/lr_finder.md).

    Step ``i`` of ``num_iter`` sets every param group's lr to ``sweep_lrs(...)[i]`` and makes
    one optimizer step over ``accumulate`` micro-batches (each micro-batch's mean loss weighted
    by its share of the group, as the Trainer does). The sweep stops early when the smoothed
    loss exceeds ``diverge_factor`` times its best value or the loss is NaN/inf.

    ``batches``: an iterable of batches, re-iterated when it runs out, or an object with
    ``.epoch(n)`` (``DeviceBatches``, trainkit.data), whose epochs 0, 1, ... are used in turn.
    ``loss_fn``: a loss function of (outputs, targets), or a ``trainkit.tasks.base.Task`` (any batch
    structure, step and sample count, exactly as the Trainer trains).
    ``device``: where batches are moved; default the model's device (the model is not moved).
    Gradients are ``None`` afterwards; everything else is restored (see the module docstring).
    """
    check_finder_args(start_lr, end_lr, num_iter, mode, smooth, diverge_factor, accumulate, precision)
    if rule not in SUGGESTION_RULES:
        raise ConfigError(f"rule must be one of {', '.join(SUGGESTION_RULES)}; got {rule!r}")
    device = _resolve_device(model, device)
    amp_dtype = autocast_dtype(precision, device)
    lrs = sweep_lrs(start_lr, end_lr, num_iter, mode)

    snapshot = _Snapshot.take(model, optimizer)
    try:
        with torch.enable_grad():
            sweep = _sweep(
                model, optimizer, _endless(batches), loss_fn, lrs, smooth, diverge_factor, accumulate,
                amp_dtype, device,
            )  # fmt: skip
    finally:
        snapshot.restore(model, optimizer)

    if sweep.stopped_early and len(sweep.losses) < MIN_POINTS:
        raise TrainkitError(
            f"the loss diverged immediately: the LR range test stopped at step {sweep.steps} of {num_iter} "
            f"(lr {lrs[sweep.steps - 1]:.3g}); lower start_lr (now {start_lr:g}) or check the data"
        )
    recorded = lrs[: len(sweep.losses)]
    suggestions = suggest_lrs(recorded, sweep.smoothed, stopped_early=sweep.stopped_early)
    return LRFinderResult(
        lrs=recorded,
        losses=sweep.losses,
        smoothed_losses=sweep.smoothed,
        suggestions=suggestions,
        suggested_lr=suggestions[rule],
        stopped_early=sweep.stopped_early,
    )


def check_finder_args(
    start_lr: float,
    end_lr: float,
    num_iter: int,
    mode: str,
    smooth: float,
    diverge_factor: float,
    accumulate: int,
    precision: str,
) -> None:
    """Raise ConfigError naming the setting and its valid range for any nonsense argument."""
    if not (math.isfinite(start_lr) and start_lr > 0):
        raise ConfigError(f"start_lr must be a finite number > 0, got {start_lr!r}")
    if not (math.isfinite(end_lr) and end_lr > start_lr):
        raise ConfigError(f"end_lr must be a finite number > start_lr ({start_lr!r}), got {end_lr!r}")
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 2:
        raise ConfigError(f"num_iter must be an integer >= 2, got {num_iter!r}")
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    if not 0.0 <= smooth < 1.0:
        raise ConfigError(f"smooth (the EMA beta) must be in [0, 1), got {smooth!r}")
    if not diverge_factor > 1.0:
        raise ConfigError(f"diverge_factor must be > 1, got {diverge_factor!r}")
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ConfigError(f"accumulate must be an integer >= 1, got {accumulate!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")


def sweep_lrs(start_lr: float, end_lr: float, num_iter: int, mode: str = "exp") -> list[float]:
    """The ``num_iter`` learning rates of the sweep: geometric ("exp") or evenly spaced ("linear")."""
    last = num_iter - 1
    if mode == "exp":
        return [start_lr * (end_lr / start_lr) ** (i / last) for i in range(num_iter)]
    return [start_lr + (end_lr - start_lr) * i / last for i in range(num_iter)]


def _resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """The given device, else the model's; a model elsewhere is an error (the finder never moves it)."""
    first_param = next(model.parameters(), None)
    model_device = first_param.device if first_param is not None else torch.device("cpu")
    if device is None:
        return model_device
    device = torch.device(device)
    same_index = device.index is None or model_device.index is None or device.index == model_device.index
    if first_param is not None and (device.type != model_device.type or not same_index):
        raise ConfigError(
            f"device {str(device)!r} differs from the model's device {str(model_device)!r}; "
            f"move the model first (lr_find leaves the model where it is)"
        )
    return device


def _endless(batches: Iterable[Batch] | Any) -> Iterator[Batch]:
    """Batches without end: the iterable again (or the next ``.epoch(n)``) whenever one pass runs out."""
    has_epochs = callable(getattr(batches, "epoch", None))
    passes = 0
    while True:
        produced = False
        for batch in batches.epoch(passes) if has_epochs else batches:
            produced = True
            yield batch
        if not produced:
            raise ConfigError(
                "lr_find got no batches: the data is empty, or an iterator that was already used up "
                "(pass a list, a DataLoader or DeviceBatches, which can be iterated again)"
            )
        passes += 1


def _sweep(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | Task,
    lrs: list[float],
    smooth: float,
    diverge_factor: float,
    accumulate: int,
    amp_dtype: torch.dtype | None,
    device: torch.device,
) -> _SweepRecord:
    """Train one step per lr, recording the losses, until the lrs run out or the loss diverges.

    A NaN/inf loss is not recorded (nor stepped on); a loss past ``diverge_factor`` is recorded.
    """
    model.train()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    smoother = _LossSmoother(smooth)
    record = _SweepRecord()
    best = math.inf
    for lr in lrs:
        record.steps += 1
        for group in optimizer.param_groups:
            group["lr"] = lr
        group_batches = [next(batches) for _ in range(accumulate)]
        loss = _accumulate_gradients(model, optimizer, group_batches, loss_fn, scaler, amp_dtype, device)
        if not math.isfinite(loss):
            record.stopped_early = True
            break
        scaler.step(optimizer)
        scaler.update()
        record.losses.append(loss)
        record.smoothed.append(smoother.update(loss))
        best = min(best, record.smoothed[-1])
        if record.smoothed[-1] > diverge_factor * best:
            record.stopped_early = True
            break
    return record


@dataclass
class _SweepRecord:
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stopped_early: bool = False
    steps: int = 0  # steps attempted, including one whose loss was NaN/inf


def _accumulate_gradients(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    group: list[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | Task,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None,
    device: torch.device,
) -> float:
    """Backward over one accumulation group; returns the group's mean loss.

    Each micro-batch's mean loss is weighted by its share of the group's samples, so the sum
    is the mean loss of one big batch even when micro-batches differ in size.
    """
    optimizer.zero_grad(set_to_none=True)
    task = loss_fn if isinstance(loss_fn, Task) else Task(loss_fn)
    group = [to_device(batch, device) for batch in group]
    counts = [task.samples(batch) for batch in group]
    group_size = sum(counts)
    group_loss = torch.zeros((), device=device, dtype=torch.float64)
    for batch, count in zip(group, counts):
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        with autocast:
            loss = task.step(model, batch).loss
        share = loss * (count / group_size)
        scaler.scale(share).backward()
        group_loss += share.detach().double()
    return group_loss.item()  # one sync per sweep step: the finder needs the value now


# ----------------------------------------------------------------------------- smoothing


class _LossSmoother:
    """Exponential moving average with bias correction, so early values are not pulled toward 0."""

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.average = 0.0
        self.steps = 0

    def update(self, loss: float) -> float:
        self.steps += 1
        self.average = self.beta * self.average + (1.0 - self.beta) * loss
        return self.average / (1.0 - self.beta**self.steps)


def smooth_losses(losses: Iterable[float], beta: float = 0.98) -> list[float]:
    """The bias-corrected EMA of ``losses`` (``avg_t / (1 - beta**t)``), as the sweep records it."""
    if not 0.0 <= beta < 1.0:
        raise ConfigError(f"beta (smooth) must be in [0, 1), got {beta!r}")
    smoother = _LossSmoother(beta)
    return [smoother.update(float(loss)) for loss in losses]


# --------------------------------------------------------------------------- suggestions


def suggest_lrs(lrs: list[float], smoothed: list[float], *, stopped_early: bool = False) -> dict[str, float]:
    """Every rule's suggestion; after an early stop the divergent tail is left out first."""
    lrs, smoothed = _usable_curve(lrs, smoothed, stopped_early)
    steepest, minimum_div_10 = suggest_steepest(lrs, smoothed), suggest_minimum_div_10(lrs, smoothed)
    return {
        "between": math.sqrt(steepest * minimum_div_10),
        "steepest": steepest,
        "minimum_div_10": minimum_div_10,
        "valley": suggest_valley(lrs, smoothed),
    }


def _usable_curve(lrs: list[float], smoothed: list[float], stopped_early: bool) -> tuple[list[float], list[float]]:
    """Drop the last SKIP_END points of a diverged curve, keeping at least MIN_POINTS."""
    if not stopped_early:
        return list(lrs), list(smoothed)
    keep = min(len(lrs), max(len(lrs) - SKIP_END, MIN_POINTS))
    return list(lrs[:keep]), list(smoothed[:keep])


def suggest_minimum_div_10(lrs: list[float], smoothed: list[float]) -> float:
    """The lr of the lowest smoothed loss / 10, but never below the first lr swept.

    The clamp matters only when the minimum is in the first decade of the sweep: the curve
    says nothing about learning rates it never tried.
    """
    _check_curve(lrs, smoothed)
    lr_at_minimum = lrs[int(np.argmin(smoothed))]
    return float(max(lr_at_minimum / 10.0, lrs[0]))


def suggest_steepest(lrs: list[float], smoothed: list[float]) -> float:
    """The lr where the smoothed loss falls fastest per decade of lr, ignoring the first 10% of points.

    Falls back to ``suggest_minimum_div_10`` when fewer than MIN_POINTS points remain or the
    loss never falls.
    """
    _check_curve(lrs, smoothed)
    skip = int(len(lrs) * SKIP_START_FRACTION)
    log_lrs, losses = np.log10(np.asarray(lrs[skip:])), np.asarray(smoothed[skip:])
    if len(losses) < MIN_POINTS:
        return suggest_minimum_div_10(lrs, smoothed)
    slopes = np.gradient(losses, log_lrs)
    steepest = int(np.argmin(slopes))
    if not slopes[steepest] < 0:
        return suggest_minimum_div_10(lrs, smoothed)
    return float(lrs[skip + steepest])


def suggest_valley(lrs: list[float], smoothed: list[float]) -> float:
    """fastai's "valley": about halfway down the longest decreasing run of the smoothed loss.

    The valley is the longest decreasing subsequence (in index order, gaps allowed, O(n²));
    the pick is ``start + int(span / 3) + int(span / 6)`` with ``span = end - start``, the
    middle of the valley's middle third, as fastai computes it. Falls back to
    ``suggest_minimum_div_10`` when the curve is shorter than MIN_POINTS or never falls.
    """
    _check_curve(lrs, smoothed)
    if len(lrs) < MIN_POINTS:
        return suggest_minimum_div_10(lrs, smoothed)
    start, end = _longest_valley(smoothed)
    if end == start:
        return suggest_minimum_div_10(lrs, smoothed)
    sections = (end - start) / 3
    return float(lrs[start + int(sections) + int(sections / 2)])


def _longest_valley(losses: list[float]) -> tuple[int, int]:
    """(first, last) index of the longest strictly decreasing subsequence of ``losses``."""
    length = [1] * len(losses)
    previous = [-1] * len(losses)
    for i in range(1, len(losses)):
        for j in range(i):
            if losses[i] < losses[j] and length[j] + 1 > length[i]:
                length[i], previous[i] = length[j] + 1, j
    end = int(np.argmax(length))  # the first index reaching the greatest length
    start = end
    while previous[start] >= 0:
        start = previous[start]
    return start, end


def _check_curve(lrs: list[float], smoothed: list[float]) -> None:
    if len(lrs) != len(smoothed) or len(lrs) == 0:
        raise ConfigError(
            f"lrs and smoothed losses must be non-empty and of equal length, got {len(lrs)} and {len(smoothed)}"
        )


# ------------------------------------------------------------------------------ no trace


_MISSING = object()


@dataclass
class _Snapshot:
    """Deep copies of everything the sweep changes, and how to put it back."""

    tensors: dict[str, Tensor]
    training_flags: list[bool]
    optimizer_state: dict[str, Any]
    opt_called: object  # the flag an attached LR scheduler reads to warn about step order
    rng: dict[str, Any]
    device: torch.device  # whose CUDA generator the RNG state holds (trainkit.devices)

    @classmethod
    def take(cls, model: nn.Module, optimizer: torch.optim.Optimizer) -> _Snapshot:
        device = module_device(model)
        return cls(
            tensors={name: t.detach().clone() for name, t in _model_tensors(model)},
            training_flags=[module.training for module in model.modules()],
            optimizer_state=copy.deepcopy(optimizer.state_dict()),
            opt_called=getattr(optimizer, "_opt_called", _MISSING),
            rng=rng_state(device),
            device=device,
        )

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for name, tensor in _model_tensors(model):
                tensor.copy_(self.tensors[name])  # in place: the optimizer keeps the same Parameters
        for module, training in zip(model.modules(), self.training_flags):
            module.training = training
        for param in model.parameters():
            param.grad = None
        optimizer.zero_grad(set_to_none=True)
        optimizer.load_state_dict(self.optimizer_state)
        if self.opt_called is _MISSING:
            optimizer.__dict__.pop("_opt_called", None)
        else:
            optimizer._opt_called = self.opt_called  # type: ignore[attr-defined]
        restore_rng(self.rng, self.device)


def _model_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Every parameter and buffer (non-persistent ones too), by qualified name."""
    yield from (("param:" + name, p) for name, p in model.named_parameters(remove_duplicate=False))
    yield from (("buffer:" + name, b) for name, b in model.named_buffers(remove_duplicate=False))


