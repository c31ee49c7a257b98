"""What the Trainer settles and checks before and around its steps: the lr for the effective
batch, the task, the data's first samples and the monitored metrics, and what a recipe-only
setting or a NaN validation metric means for the user — each in one line, never mid-run."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from trainkit.data.epochs import EpochBatches, as_epoch_batches
from trainkit.loop.callbacks import Callback, EarlyStopping
from trainkit.config.names import LOOP_MONITORABLE
from trainkit.config.schema import TrainConfig
from trainkit.errors import ConfigError
from trainkit.optim.optimizers import batch_scaled_lr
from trainkit.tasks.base import Task, check_data, parameter_dtype
from trainkit.tasks.kinds import as_task, named_loss

log = logging.getLogger("trainkit")


def scaled_lr(config: TrainConfig) -> float:
    """--lr, scaled by --lr-scaling for the effective batch (batch_size x accumulate, global under DDP)."""
    if config.lr_scaling is None:
        return config.lr
    if config.batch_size == "auto":
        raise ConfigError("--lr-scaling needs the batch size; --batch-size auto is only known later: give a number")
    batch = config.batch_size * config.accumulate
    lr = batch_scaled_lr(config.lr, batch, config.lr_reference_batch, config.lr_scaling)
    log.info("--lr-scaling %s: lr %g for batch %d -> %g for the effective batch %d",
             config.lr_scaling, config.lr, config.lr_reference_batch, lr, batch)  # fmt: skip
    return lr


def trainer_task(config: TrainConfig, task: Task | str | None, loss_fn: Any, metrics: Any, step: Any) -> Task:
    """The given Task; else one built from the arguments, falling back on the config's task, loss
    and metrics (what ``--task``/``--loss``/``--metrics`` set), so TrainConfig(task="regression") holds."""
    if isinstance(task, Task):
        if config.label_smoothing != getattr(task, "label_smoothing", 0.0):
            raise ConfigError(f"the config's label_smoothing {config.label_smoothing:g} is not the given task's "
                              f"{getattr(task, 'label_smoothing', 0.0):g}: set it on the task, or in the config alone")  # fmt: skip
        return as_task(task, loss_fn=loss_fn, metrics=metrics, step=step)
    if task is None and not (step is not None and config.task == "classification"):
        task = config.task
    return as_task(task, loss_fn=loss_fn if loss_fn is not None else named_loss(config.loss),
                   metrics=metrics if metrics is not None else config.metrics, step=step,
                   label_smoothing=config.label_smoothing)  # fmt: skip


def warn_about_recipe_settings(config: TrainConfig, callbacks: Sequence[Callback]) -> None:
    """patience (and min_delta for it) builds train_run's EarlyStopping; a Trainer user who sets it
    expects early stopping, so say where it goes instead of ignoring it silently."""
    default = TrainConfig.__dataclass_fields__["patience"].default
    if config.patience not in (0, default) and not any(isinstance(c, EarlyStopping) for c in callbacks):
        log.warning("TrainConfig.patience is read by train_run and the CLI; with the Trainer pass "
                    "callbacks=[EarlyStopping(%r, patience=%d)] for early stopping", config.monitor, config.patience)  # fmt: skip


def training_batches(data: Any, config: TrainConfig, device: torch.device, rank: int, world_size: int) -> EpochBatches:
    """The training data as EpochBatches (shuffled by (seed, epoch), this rank's shard)."""
    if config.batch_size == "auto":
        raise ConfigError("Trainer needs a numeric batch_size; trainkit.loop.memory.find_batch_size finds one (train_run does)")
    return as_epoch_batches(
        data, batch_size=config.batch_size, seed=config.seed, shuffle=True, lockstep=True,
        num_workers=config.num_workers, pin_memory=device.type == "cuda", rank=rank,
        world_size=world_size, steps_per_epoch=steps_without_length(data, config),
    )  # fmt: skip


def steps_without_length(data: Any, config: TrainConfig) -> int | None:
    """Batches per epoch for data without a length: the run's --max-steps (times accumulation)."""
    try:
        len(data)
        return None
    except TypeError:
        return config.max_steps * config.accumulate if config.max_steps else None




def check_data_splits(task: Task, model: nn.Module, splits: Mapping[str, Any], prefix: str) -> None:
    """The first samples of each split (whole tensors in memory) checked against the task and
    the model's dtype before any step: labels the loss cannot take, samples that do not stack,
    a lying __len__, float64 features. The label guard's records start afresh."""
    dtype = parameter_dtype(model)
    for split, data in splits.items():
        if data is not None:
            check_data(task, data, f"{prefix}{split}", dtype)
    task.labels_seen(training=True)  # what the LR finder or batch-size probe left
    task.labels_seen(training=False)


def check_monitors(task: Task, monitor: str, callbacks: Sequence[Callback], *, has_validation: bool) -> None:
    """--monitor (and each EarlyStopping's) must name a metric this run produces: refused before
    training, not after its first epoch. A val_ metric without validation data is not tracked."""
    available = task.monitorable(LOOP_MONITORABLE)
    available += [name for callback in callbacks for name in callback.adds_metrics]
    monitors = [monitor] + [c.monitor for c in callbacks if isinstance(c, EarlyStopping)]
    for name in monitors:
        if name not in available and (has_validation or not name.startswith("val_")):
            raise ConfigError(f"--monitor {name!r} is not a metric of this run; choose one of {', '.join(available)}")


def warn_if_validation_nonfinite(metrics: Mapping[str, Any], position: str, callbacks: Sequence[Callback],
                                 watches_plateau: bool) -> None:  # fmt: skip
    """A NaN/inf validation metric is not a measurement: say so once per validation, and what
    ignores it, instead of letting it pass silently through history, early stopping and the schedule."""
    bad = [f"{name} {value}" for name, value in metrics.items()
           if name.startswith("val_") and isinstance(value, float) and not math.isfinite(value)]  # fmt: skip
    if not bad:
        return
    effects = ["it never counts as the best"]
    if any(isinstance(callback, EarlyStopping) for callback in callbacks):
        effects.append("early stopping counts it as a validation without improvement")
    if watches_plateau:
        effects.append("the plateau schedule skips it")
    log.warning("validation after %s gave %s: %s; look for NaN/inf in the validation data, or batches "
                "whose labels are all the ignore index", position, ", ".join(bad), ", ".join(effects))
