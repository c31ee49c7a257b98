"""Learning-rate schedules by name, built from ``torch.optim.lr_scheduler``.

Every schedule is defined in optimizer steps and stepped once per optimizer step, so
epoch-based shapes (step decay, cosine over the run) and step-based ones (warmup,
1cycle) mix correctly with any batch size and gradient accumulation.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim import lr_scheduler as sched

from trainkit.errors import ConfigError

SCHEDULE_NAMES = ("constant", "step", "cosine", "warmup_cosine", "onecycle")

WARMUP_START_FACTOR = 0.01  # warmup begins at 1% of the peak lr
STEP_DECAY_FACTOR = 0.1  # step schedule: lr x0.1 at each third of the run
ONECYCLE_PCT_START = 0.3


def build_scheduler(
    name: str, optimizer: Optimizer, *, total_steps: int, warmup_steps: int = 0
) -> sched.LRScheduler:
    """The named schedule over ``total_steps`` optimizer steps; peak lr is the optimizer's lr."""
    if total_steps < 1:
        raise ConfigError(f"a schedule needs at least one optimizer step, got total_steps={total_steps}")
    if name == "constant":
        return sched.LambdaLR(optimizer, lambda step: 1.0)
    if name == "step":
        return sched.StepLR(optimizer, step_size=math.ceil(total_steps / 3), gamma=STEP_DECAY_FACTOR)
    if name == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=total_steps)
    if name == "warmup_cosine":
        return _warmup_then_cosine(optimizer, total_steps, warmup_steps)
    if name == "onecycle":
        max_lrs = [group["lr"] for group in optimizer.param_groups]
        return sched.OneCycleLR(
            optimizer, max_lr=max_lrs, total_steps=total_steps, pct_start=ONECYCLE_PCT_START, cycle_momentum=False
        )
    raise ConfigError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")


def _warmup_then_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int) -> sched.LRScheduler:
    warmup_steps = min(max(warmup_steps, 0), total_steps - 1)
    cosine = sched.CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps)
    if warmup_steps == 0:
        return cosine
    warmup = sched.LinearLR(optimizer, start_factor=WARMUP_START_FACTOR, total_iters=warmup_steps)
    return sched.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


def scale_learning_rate(optimizer: Optimizer, scheduler: sched.LRScheduler | None, factor: float) -> None:
    """Multiply the current lr and the rest of the schedule by ``factor`` (used after a rollback).

    Closed-form schedulers compute from ``base_lrs`` and chainable ones from the current lr,
    so scaling both (and OneCycle's max/min/initial lr) scales every later value.
    """
    for group in optimizer.param_groups:
        for key in LR_KEYS:
            if key in group:
                group[key] *= factor
    for scheduler_ in _with_children(scheduler):
        scheduler_.base_lrs = [lr * factor for lr in scheduler_.base_lrs]
        if hasattr(scheduler_, "_last_lr"):
            scheduler_._last_lr = [lr * factor for lr in scheduler_._last_lr]


def _with_children(scheduler: sched.LRScheduler | None) -> list[sched.LRScheduler]:
    if scheduler is None:
        return []
    return [scheduler, *getattr(scheduler, "_schedulers", [])]
