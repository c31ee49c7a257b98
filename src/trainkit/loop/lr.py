"""The run's learning rate over time, in one object: the schedule (trainkit.optim.schedules, or the
user's own ``LRScheduler``), SWA's ``SWALR`` once it takes over (``--swa-start --swa-lr``), the
scale that rollbacks leave (``lr_scale``), and reduce-on-plateau's look at the monitored metric."""

from __future__ import annotations

from typing import Any

import torch

from trainkit.config.schema import TrainConfig
from trainkit.optim.schedules import ScheduleSpec, build_scheduler


def schedule_spec(config: TrainConfig, steps_per_epoch: int, total_steps: int | None = None) -> ScheduleSpec:
    """The config's schedule in optimizer steps (users think in epochs; schedules run in steps).

    A --max-steps run without --warmup warms up like an epoch run: one epoch, at most half the run.
    """

    def steps(epochs: float | None) -> int | None:
        return None if epochs is None else max(1, round(epochs * steps_per_epoch))

    if config.warmup_steps is not None:
        warmup = config.warmup_steps
    elif config.warmup is not None:
        warmup = round(config.warmup * steps_per_epoch)
    else:
        total = total_steps or steps_per_epoch
        warmup = min(steps_per_epoch, total // 2) if config.schedule == "warmup_cosine" else 0
    return ScheduleSpec(
        name=config.schedule,
        warmup_steps=warmup,
        min_lr=config.min_lr,
        step_size=steps(config.step_epochs),
        gamma=config.gamma,
        milestones=tuple(steps(epoch) - warmup for epoch in config.milestones),  # counted after warmup
        pct_start=config.pct_start,
        anneal=config.anneal,
        restart_steps=steps(config.restart_epochs),
        restart_mult=config.restart_mult,
        plateau_patience=config.plateau_patience,
        plateau_factor=config.plateau_factor,
        plateau_mode=config.monitor_mode,
    )


class LrControl:
    """Steps the schedule once per optimizer step (skipped steps too, so later steps keep their lr)."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig,
                 user_scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> None:  # fmt: skip
        self.optimizer, self.config, self.user_scheduler = optimizer, config, user_scheduler
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.swa: torch.optim.swa_utils.SWALR | None = None  # replaces the schedule from --swa-start
        self.scale = 1.0  # what rollbacks multiplied the lr by
        self.steps_per_epoch = 1

    def start(self, steps_per_epoch: int, total_steps: int) -> None:
        """Build the schedule once the data's length is known (fit)."""
        self.steps_per_epoch = steps_per_epoch
        self.scheduler = self.user_scheduler or build_scheduler(
            schedule_spec(self.config, steps_per_epoch, total_steps), self.optimizer, total_steps=total_steps
        )

    @property
    def current(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self) -> None:
        (self.swa or self.scheduler).step()

    def on_epoch_start(self, epoch: int) -> None:
        """From --swa-start on, SWALR anneals the lr to --swa-lr over one epoch and holds it."""
        if self.config.swa_lr is not None and self.swa is None and epoch >= self.config.swa_start:
            self.swa = self._swa_schedule()

    def on_metrics(self, metrics: dict[str, float]) -> None:
        """Reduce-on-plateau's look at the monitored metric, once per epoch (not once SWALR rules)."""
        step_metric = getattr(self.scheduler, "step_metric", None)
        if step_metric is not None and self.swa is None and self.config.monitor in metrics:
            step_metric(metrics[self.config.monitor])

    def watches_plateau(self) -> bool:
        return callable(getattr(self.scheduler, "step_metric", None))

    def _swa_schedule(self) -> torch.optim.swa_utils.SWALR:
        return torch.optim.swa_utils.SWALR(self.optimizer, swa_lr=self.config.swa_lr * self.scale,
                                           anneal_epochs=self.steps_per_epoch, anneal_strategy="cos")  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint's ``scheduler``, ``swa_scheduler`` and ``lr_scale``."""
        return {
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "swa_scheduler": self.swa.state_dict() if self.swa is not None else None,
            "lr_scale": self.scale,
        }

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """The schedule, then a new SWALR (building it sets the lr) and its state, then the scale."""
        if self.scheduler is not None and payload["scheduler"] is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        self.swa = None
        if payload.get("swa_scheduler") is not None:
            self.swa = self._swa_schedule()
            self.swa.load_state_dict(payload["swa_scheduler"])
        self.scale = payload["lr_scale"]
