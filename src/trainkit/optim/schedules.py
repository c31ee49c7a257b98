"""Learning-rate schedules by name, built from ``torch.optim.lr_scheduler``.

Every schedule is defined in optimizer steps and stepped once per optimizer step, so
epoch-based shapes (step decay, cosine over the run) and step-based ones (warmup,
1cycle) mix correctly with any batch size and gradient accumulation.

The one exception is ``plateau``: it reacts to a validation metric, so besides ``step()``
once per optimizer step it has ``step_metric(value)``, which the trainer calls once per
epoch end on every schedule that has it.

The shapes that end somewhere (cosine, linear, exponential, onecycle) reach their end
value at the last of ``total_steps`` steps, so the final optimizer step uses it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as sched

from trainkit.errors import ConfigError

log = logging.getLogger("trainkit")

SCHEDULE_NAMES = (
    "constant", "step", "multistep", "exponential", "cosine", "warmup_cosine", "linear",
    "onecycle", "cosine_restarts", "plateau",
)  # fmt: skip
ANNEAL_NAMES = ("cos", "linear")
PLATEAU_MODES = ("min", "max")

WARMUP_START_FACTOR = 0.01  # warmup begins at 1% of the peak lr
STEP_DECAYS = 3  # step: by default the lr decays at each third of the run
MULTISTEP_FRACTIONS = (0.5, 0.75)  # multistep: default milestones, as fractions of the post-warmup steps
EXPONENTIAL_END_FACTOR = 0.01  # exponential: by default the lr ends at 1% of the peak (or min_lr if higher)
MAX_CURVE_STEPS = 10**6  # lr_curve steps a real scheduler: a million steps take seconds
RESTART_FRACTION = 4  # cosine_restarts: by default the first cycle is a quarter of the run


@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule in optimizer steps. The peak lr is the optimizer's lr.

    ``warmup_steps`` of linear warmup from 1% of the peak come first (any schedule but
    onecycle, which has its own rise); the named schedule then runs over the remaining
    steps, and step counts such as ``milestones`` are counted from the end of warmup.
    Fields that do not apply to ``name`` are ignored, but are still checked.
    """

    name: str = "cosine"
    warmup_steps: int = 0
    min_lr: float = 0.0  # floor: end of cosine/linear, eta_min of cosine_restarts, onecycle's final lr, plateau's min
    step_size: int | None = None  # step: steps between decays (None: a third of the post-warmup steps)
    gamma: float = 0.1  # step / multistep decay factor
    milestones: tuple[int, ...] = ()  # multistep: steps after warmup (empty: 50% and 75% of them)
    exp_gamma: float | None = None  # exponential: per-step factor (None: end at max(min_lr, 1% of peak))
    pct_start: float = 0.3  # onecycle: fraction of the run spent rising
    anneal: str = "cos"  # onecycle: "cos" or "linear"
    restart_steps: int | None = None  # cosine_restarts: first cycle length T_0 (None: a quarter of the run)
    restart_mult: int = 1  # cosine_restarts: cycle length multiplier T_mult
    plateau_patience: int = 2  # plateau: epochs without improvement before lowering the lr
    plateau_factor: float = 0.1  # plateau: lr multiplier
    plateau_mode: str = "min"  # plateau: "min" or "max" of the monitored metric

    def __post_init__(self) -> None:
        _require_choice("schedule", self.name, SCHEDULE_NAMES)
        _require_int_at_least("warmup_steps", self.warmup_steps, 0)
        if self.name == "onecycle" and self.warmup_steps > 0:
            raise ConfigError(
                f"onecycle has its own warmup (pct_start); warmup_steps must be 0, got {self.warmup_steps}"
            )
        if not self.min_lr >= 0:
            raise ConfigError(f"min_lr must be >= 0, got {self.min_lr}")
        if self.step_size is not None:
            _require_int_at_least("step_size", self.step_size, 1)
        _require_open_unit_interval("gamma", self.gamma)
        _require_milestones(self.milestones)
        if self.exp_gamma is not None and not 0.0 < self.exp_gamma <= 1.0:
            raise ConfigError(f"exp_gamma must be in (0, 1], got {self.exp_gamma}")
        _require_open_unit_interval("pct_start", self.pct_start)
        _require_choice("anneal", self.anneal, ANNEAL_NAMES)
        if self.restart_steps is not None:
            _require_int_at_least("restart_steps", self.restart_steps, 1)
        _require_int_at_least("restart_mult", self.restart_mult, 1)
        _require_int_at_least("plateau_patience", self.plateau_patience, 0)
        _require_open_unit_interval("plateau_factor", self.plateau_factor)
        _require_choice("plateau_mode", self.plateau_mode, PLATEAU_MODES)


class PlateauSchedule:
    """Optional step-based warmup, then ``ReduceLROnPlateau`` driven by a per-epoch metric.

    ``ReduceLROnPlateau`` needs a metric, so it cannot sit inside ``SequentialLR``; this
    wrapper gives it the same per-step ``step()`` as the other schedules and adds
    ``step_metric()``. Metrics reported during warmup are ignored: the lr is still rising.
    """

    def __init__(self, optimizer: Optimizer, spec: ScheduleSpec) -> None:
        self.optimizer = optimizer
        self.warmup_steps = spec.warmup_steps
        self.steps_done = 0
        self.plateau = sched.ReduceLROnPlateau(
            optimizer,
            mode=spec.plateau_mode,  # type: ignore[arg-type]
            factor=spec.plateau_factor,
            patience=spec.plateau_patience,
            min_lr=spec.min_lr,
        )
        self.warmup = _linear_warmup(optimizer, spec.warmup_steps) if spec.warmup_steps > 0 else None

    @property
    def schedulers(self) -> list[sched.LRScheduler]:
        """The torch schedulers inside (for lr scaling)."""
        return [s for s in (self.warmup, self.plateau) if s is not None]

    @property
    def in_warmup(self) -> bool:
        return self.steps_done < self.warmup_steps

    def step(self) -> None:
        """Call once per optimizer step: advances the warmup, if any is left."""
        if self.warmup is not None and self.in_warmup:
            self.warmup.step()
        self.steps_done += 1

    def step_metric(self, value: float) -> None:
        """Call once per epoch end with the monitored metric; lowers the lr when it stalls.

        A NaN/inf value is no measurement and is skipped: ReduceLROnPlateau would count it as an
        epoch without improvement and cut the lr for what is a problem of the validation data."""
        if not self.in_warmup and math.isfinite(value):
            self.plateau.step(value)

    def get_last_lr(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps_done": self.steps_done,
            "warmup": self.warmup.state_dict() if self.warmup is not None else None,
            "plateau": self.plateau.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = state["steps_done"]
        if self.warmup is not None and state["warmup"] is not None:
            self.warmup.load_state_dict(state["warmup"])
        self.plateau.load_state_dict(state["plateau"])


Schedule = sched.LRScheduler | PlateauSchedule
"""What ``build_scheduler`` returns. Step it once per optimizer step; if it has
``step_metric`` (plateau), also call that once per epoch end with the monitored metric."""


def build_scheduler(
    spec: ScheduleSpec | str, optimizer: Optimizer, *, total_steps: int, warmup_steps: int | None = None
) -> Schedule:
    """The schedule ``spec`` over ``total_steps`` optimizer steps; the peak lr is the optimizer's lr.

    ``spec`` may be just a name. ``warmup_steps``, if given, overrides ``spec.warmup_steps``
    (the older call form); warmup is clamped so at least one step follows it.
    """
    spec = _resolve_spec(spec, warmup_steps)
    _require_int_at_least("total_steps", total_steps, 1)
    if spec.warmup_steps > total_steps - 1:
        log.warning("warmup of %d steps shortened to %d: at least one step must follow it (%d in the run)",
                    spec.warmup_steps, total_steps - 1, total_steps)  # fmt: skip
        spec = replace(spec, warmup_steps=total_steps - 1)
    _require_floor_below_peak(spec.min_lr, optimizer)
    if spec.name == "onecycle":
        return _onecycle(optimizer, spec, total_steps)
    if spec.name == "plateau":
        return PlateauSchedule(optimizer, spec)
    main = _main_schedule(optimizer, spec, total_steps - spec.warmup_steps)
    return _after_warmup(optimizer, main, spec.warmup_steps)


def _resolve_spec(spec: ScheduleSpec | str, warmup_steps: int | None) -> ScheduleSpec:
    if isinstance(spec, str):
        spec = ScheduleSpec(name=spec) if warmup_steps is None else ScheduleSpec(name=spec, warmup_steps=warmup_steps)
    elif warmup_steps is not None:
        spec = replace(spec, warmup_steps=warmup_steps)
    return spec


def _main_schedule(optimizer: Optimizer, spec: ScheduleSpec, steps: int) -> sched.LRScheduler:
    """The named shape over ``steps`` steps (those after warmup); it ends at the last of them."""
    last = max(steps - 1, 1)  # index of the last step, where end values are reached
    name = spec.name
    if name == "constant":
        return sched.LambdaLR(optimizer, lambda _: 1.0)
    if name == "step":
        step_size = spec.step_size if spec.step_size is not None else math.ceil(steps / STEP_DECAYS)
        return sched.StepLR(optimizer, step_size=step_size, gamma=spec.gamma)
    if name == "multistep":
        milestones = spec.milestones or _default_milestones(steps)
        return sched.MultiStepLR(optimizer, milestones=list(milestones), gamma=spec.gamma)
    if name == "exponential":
        gamma = spec.exp_gamma if spec.exp_gamma is not None else _exp_gamma_to_reach_end(spec, optimizer, last)
        return sched.ExponentialLR(optimizer, gamma=gamma)
    if name in ("cosine", "warmup_cosine"):
        return sched.CosineAnnealingLR(optimizer, T_max=last, eta_min=spec.min_lr)
    if name == "linear":
        end_factor = spec.min_lr / _peak_lr(optimizer)
        return sched.LinearLR(optimizer, start_factor=1.0, end_factor=end_factor, total_iters=last)
    if name == "cosine_restarts":
        restart_steps = spec.restart_steps if spec.restart_steps is not None else max(1, steps // RESTART_FRACTION)
        return sched.CosineAnnealingWarmRestarts(
            optimizer, T_0=restart_steps, T_mult=spec.restart_mult, eta_min=spec.min_lr
        )
    raise AssertionError(f"schedule {name!r} is built elsewhere")  # onecycle, plateau


def _after_warmup(optimizer: Optimizer, main: sched.LRScheduler, warmup_steps: int) -> sched.LRScheduler:
    if warmup_steps == 0:
        return main
    warmup = _linear_warmup(optimizer, warmup_steps)
    return sched.SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])


def _linear_warmup(optimizer: Optimizer, warmup_steps: int) -> sched.LinearLR:
    return sched.LinearLR(optimizer, start_factor=WARMUP_START_FACTOR, total_iters=warmup_steps)


def _default_milestones(steps: int) -> tuple[int, ...]:
    return tuple(sorted({max(1, round(fraction * steps)) for fraction in MULTISTEP_FRACTIONS}))


def _exp_gamma_to_reach_end(spec: ScheduleSpec, optimizer: Optimizer, last: int) -> float:
    """The per-step factor that takes the peak to max(min_lr, 1% of peak) at step ``last``."""
    peak = _peak_lr(optimizer)
    end = max(spec.min_lr, EXPONENTIAL_END_FACTOR * peak)
    return (end / peak) ** (1.0 / last)


def _onecycle(optimizer: Optimizer, spec: ScheduleSpec, total_steps: int) -> sched.OneCycleLR:
    rise = spec.pct_start * total_steps
    if rise <= 1:  # torch's OneCycleLR divides by zero at exactly 1 and has no rise below it
        raise ConfigError(
            f"onecycle needs pct_start * total_steps > 1 so the lr rises for at least one step, "
            f"got {spec.pct_start} * {total_steps}"
        )
    div_factor = 25.0  # torch's default: start at peak / 25
    peak = _peak_lr(optimizer)
    final_div_factor = peak / (div_factor * spec.min_lr) if spec.min_lr > 0 else 1e4
    return sched.OneCycleLR(
        optimizer,
        max_lr=[float(group["lr"]) for group in optimizer.param_groups],
        total_steps=total_steps,
        pct_start=float(spec.pct_start),
        anneal_strategy=spec.anneal,  # type: ignore[arg-type]
        cycle_momentum=False,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
    )


def _peak_lr(optimizer: Optimizer) -> float:
    """The optimizer's lr (its first param group's): relative floors are computed from it."""
    return float(optimizer.param_groups[0]["lr"])


# ------------------------------------------------------------------ lr scaling
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr", "swa_lr")  # param-group keys (OneCycleLR, SWALR keep theirs there)
SCHEDULER_FLOOR_KEYS = ("eta_min",)  # cosine floors, absolute values held by the scheduler


def scale_learning_rate(optimizer: Optimizer, scheduler: Schedule | None, factor: float) -> None:
    """Multiply the current lr and the rest of the schedule by ``factor`` (used after a rollback).

    Closed-form schedulers compute from ``base_lrs`` and chainable ones from the current lr;
    floors (cosine ``eta_min``, plateau ``min_lrs``, onecycle's ``min_lr``) are absolute, so
    scaling all of them scales every later value, exactly.
    """
    for group in optimizer.param_groups:
        for key in LR_KEYS:
            if key in group:
                group[key] *= factor
    for scheduler_ in _with_children(scheduler):
        for key in ("base_lrs", "_last_lr", "min_lrs"):
            if hasattr(scheduler_, key):
                setattr(scheduler_, key, [lr * factor for lr in getattr(scheduler_, key)])
        for key in SCHEDULER_FLOOR_KEYS:
            if hasattr(scheduler_, key):
                setattr(scheduler_, key, getattr(scheduler_, key) * factor)
        if getattr(scheduler_, "default_min_lr", None) is not None:  # ReduceLROnPlateau
            scheduler_.default_min_lr *= factor


def _with_children(scheduler: Schedule | None) -> list[Any]:
    """The scheduler and every scheduler inside it (SequentialLR, PlateauSchedule), depth first."""
    if scheduler is None:
        return []
    if isinstance(scheduler, PlateauSchedule):
        children = scheduler.schedulers
    else:
        children = getattr(scheduler, "_schedulers", [])
    return [scheduler, *(nested for child in children for nested in _with_children(child))]


# ------------------------------------------------------------ curves and plots
def lr_curve(
    spec: ScheduleSpec | str,
    *,
    lr: float,
    total_steps: int,
    metrics: Sequence[float] | None = None,
    steps_per_epoch: int | None = None,
) -> list[float]:
    """The lr used by each of ``total_steps`` optimizer steps, for previews and tests.

    Plateau reacts to ``metrics`` (one per epoch, reported after every ``steps_per_epoch``
    steps; default: the epochs spread evenly over the run); without them it stays flat.
    """
    if not 0 < lr < math.inf:
        raise ConfigError(f"lr must be a positive finite number, got {lr}")
    if total_steps > MAX_CURVE_STEPS:
        raise ConfigError(f"a preview of at most {MAX_CURVE_STEPS:,} steps, got {total_steps:,}: the curve is stepped one step at a time")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = build_scheduler(spec, optimizer, total_steps=total_steps)
    metric_at_step = _metric_schedule(metrics or (), steps_per_epoch, total_steps)
    lrs = []
    for step in range(total_steps):
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        schedule.step()
        if step in metric_at_step and hasattr(schedule, "step_metric"):
            schedule.step_metric(metric_at_step[step])
    return lrs


def _metric_schedule(metrics: Sequence[float], steps_per_epoch: int | None, total_steps: int) -> dict[int, float]:
    """{index of an epoch's last optimizer step: that epoch's metric}."""
    if not metrics:
        return {}
    if steps_per_epoch is None:
        steps_per_epoch = max(1, total_steps // len(metrics))
    _require_int_at_least("steps_per_epoch", steps_per_epoch, 1)
    return {(epoch + 1) * steps_per_epoch - 1: value for epoch, value in enumerate(metrics)}


def plot_schedules(
    specs: Sequence[ScheduleSpec | str], path: str | Path, *, lr: float, total_steps: int, log_scale: bool = False
) -> Path:
    """One PNG comparing the lr curves of ``specs`` over ``total_steps`` optimizer steps."""
    from trainkit.tracking.plots import pyplot

    plt = pyplot()

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for spec in specs:
        ax.plot(range(total_steps), lr_curve(spec, lr=lr, total_steps=total_steps), label=_label(spec))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    if log_scale:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _label(spec: ScheduleSpec | str) -> str:
    if isinstance(spec, str):
        return spec
    return f"{spec.name} (warmup {spec.warmup_steps})" if spec.warmup_steps else spec.name


# ----------------------------------------------------------------- validation
def _require_choice(setting: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {setting} {value!r}; choose one of {', '.join(choices)}")


def _require_int_at_least(setting: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{setting} must be an integer >= {minimum}, got {value!r}")


def _require_open_unit_interval(setting: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{setting} must be in (0, 1), got {value}")


def _require_milestones(milestones: Sequence[int]) -> None:
    for milestone in milestones:
        _require_int_at_least("milestones (steps after warmup)", milestone, 1)
    if list(milestones) != sorted(set(milestones)):
        raise ConfigError(f"milestones must be strictly increasing, got {tuple(milestones)}")


def _require_floor_below_peak(min_lr: float, optimizer: Optimizer) -> None:
    peaks = [float(group["lr"]) for group in optimizer.param_groups]
    if not all(peak > 0 for peak in peaks):
        raise ConfigError(f"a schedule needs a positive peak lr, got {peaks}")
    if min_lr > min(peaks):
        raise ConfigError(f"min_lr must be at most the peak lr {min(peaks)}, got {min_lr}")
