"""The training loop, in one place, in plain PyTorch.

``Trainer.fit`` does what every practitioner should do and many forget:
``model.train()`` while fitting and ``model.eval()`` + ``torch.inference_mode()`` for
evaluation; ``zero_grad(set_to_none=True)``; AdamW with decay only on weights; the
loss of each accumulation group scaled by the group's real size; autocast with the
gradients unscaled before clipping; the pre-clip gradient norm logged; a policy for
NaN losses; checkpoints at epoch ends (and every N steps) that resume exactly.

Exact resume: a checkpoint holds every piece of state that the rest of the run depends
on (weights, optimizer, scheduler, scaler, RNG, the position inside the epoch and the
epoch's running metrics), and each epoch's data order is a function of (seed, epoch)
alone. Replaying from a checkpoint therefore performs the same operations in the same
order as the uninterrupted run.

Data parallel (``--strategy ddp``, see docs/scaling.md): when a process group is active
(trainkit.distributed) the model is wrapped in DistributedDataParallel, each rank trains on
its slice of every global batch, and the places where ranks must agree do so explicitly:
metric sums and evaluation counts are all-reduced, rank 0's epoch metrics and early-stopping
decision are broadcast, interrupts and NaN checks are agreed by all-reduce, and checkpoints
gather every rank's RNG and running sums. Every collective runs on every rank in the same
order; only file writes are limited to rank 0.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.profiler import record_function
from tqdm import tqdm

import trainkit
from trainkit import distributed, fsdp
from trainkit.averaging import WeightAverage
from trainkit.callbacks import Callback, EarlyStopping, TrainState, callback_keys, check_callbacks, is_improvement
from trainkit.checkpoint import CheckpointDir, all_finite, load_checkpoint, state_dict_mismatch
from trainkit.config import DEFAULT_SKIP_FRACTION, LOOP_MONITORABLE, TrainConfig
from trainkit.batches import DeviceBatches, EpochBatches, LoaderBatches, as_epoch_batches
from trainkit.devices import (
    explaining_nondeterministic_ops, free_cached_device_memory, host_copy, restore_rng, rng_state, run_device, to_host,
)  # fmt: skip
from trainkit.errors import (
    CheckpointError, ConfigError, DataError, NonFiniteLossError, TrainingInterrupted, TrainkitError,
)  # fmt: skip
from trainkit.faults import crash_point
from trainkit.history import EpochMeter, HistoryFile, format_epoch, merged_meter_state
from trainkit.lr_finder import LRFinderResult, lr_find
from trainkit.optim import batch_scaled_lr, build_optimizer, check_user_optimizer
from trainkit.precision import autocast_dtype, masked_by_overflow, overflow
from trainkit.rundir import holding_run_folder, remove_stale_temp_files
from trainkit.checkpoint.sharded import load_into, sharded_copies, with_copies
from trainkit.runtime import batch_rows, concatenate, map_tensors, split_batch, to_device
from trainkit.schedules import ScheduleSpec, build_scheduler, scale_learning_rate
from trainkit.strategies import Strategy, make_strategy
from trainkit.tasks import (
    LabelsSeen, StepOutput, Task, as_task, check_data, detached, model_logits, model_loss, named_loss, no_target_text,
    parameter_dtype,
)  # fmt: skip

log = logging.getLogger("trainkit")

Batch = Any  # a tensor, tuple, list, dict or dataclass of tensors (trainkit.runtime)
NONFINITE_CHECK_EVERY = 50  # optimizer steps between looks at the logged losses ("raise")


class NonFiniteStep(Exception):
    """Internal: a step produced NaN/inf under the rollback policy."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


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


def phase(name: str):
    """Label a phase of the step ("data", "forward", "backward", "optimizer") for ``trainkit profile``.

    A no-op unless a profiler is running: record_function alone costs ~10 us per call on CPU.
    """
    return record_function(name) if torch.autograd.profiler._is_profiler_enabled else nullcontext()


class BufferSnapshot:
    """Copies of a model's buffers (BatchNorm running statistics and counters), so a step that is
    skipped (``--on-nonfinite skip``) or retried after running out of memory can undo what its
    forward passes did to them. One foreach copy per step; nothing for a model without buffers."""

    def __init__(self, model: nn.Module) -> None:
        self.live = list(model.buffers())
        self.saved = [buffer.detach().clone() for buffer in self.live]

    @torch.no_grad()
    def take(self) -> None:
        if self.live:
            torch._foreach_copy_(self.saved, self.live)

    @torch.no_grad()
    def restore(self) -> None:
        if self.live:
            torch._foreach_copy_(self.live, self.saved)


def labelled_as_data(batches: Iterable[Batch], where: Callable[[], str]) -> Iterator[Batch]:
    """The batches, with fetching each one (indexing, augmentation) labelled "data" for the profiler;
    a DataError while fetching (samples that do not stack) says ``where()`` it happened."""
    iterator = iter(batches)
    while True:
        with phase("data"):
            try:
                batch = next(iterator, None)
            except DataError as exc:
                raise DataError(f"{where()}: {data_error_text(exc)}") from None
        if batch is None:
            return
        yield batch


def data_error_text(exc: DataError) -> str:
    """A DataError's message; one raised in a DataLoader worker comes back wrapped in the worker's
    traceback, whose last line holds it."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(f"{DataError.__name__}: ", 1)[-1]
    return text


def split_micro_batches(group: list[Batch], size: int | None) -> list[Batch]:
    """Each micro-batch of ``group`` cut into pieces of at most ``size`` rows, in order (None: as is)."""
    if size is None:
        return group
    return [piece for batch in group for piece in split_batch(batch, size)]


def group_batches(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Consecutive micro-batches in groups of ``size``; the last group may be shorter."""
    group: list[Batch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


class Trainer:
    """Fit any model on any data with the practices in ``TrainConfig``; see the module docstring.

    ``task``: what a batch means and what is measured (a ``trainkit.tasks.Task`` or one of
    ``TASKS``' names; default classification). ``loss_fn``, ``metrics`` and ``step`` build the task
    when it is given by name. ``optimizer``/``scheduler``: the user's own objects instead of the
    configured ones (trainkit's optimizer keeps weight decay off biases and norm weights);
    a scheduler is stepped once per optimizer step. ``scaler``: your own ``torch.amp.GradScaler``
    (another ``init_scale`` or growth interval) instead of fp16's default one.
    """

    # Set by the out-of-memory back-off: micro-batches (evaluation batches) are cut to this size from then on.
    micro_batch_size: int | None = None
    eval_micro_batch_size: int | None = None
    _reducing = False  # inside a backward that all-reduces DDP's gradients
    # Set when fit ends with SWA's average as the weights: no validation row measured them.
    swa_applied: bool = False

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        *,
        callbacks: Sequence[Callback] = (),
        out_dir: str | Path | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        task: Task | str | None = None,
        metrics: Mapping[str, Any] | Sequence[str] | None = None,
        step: Callable[[nn.Module, Any], Any] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        scaler: torch.amp.GradScaler | None = None,
        run_info: dict[str, Any] | None = None,
        strategy: Strategy | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"Trainer needs a torch.nn.Module as its model, got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"Trainer needs a trainkit.TrainConfig, got {type(config).__name__}")
        self.config = config.resolved(loop_only=True)  # the recipe fields (dataset, model, ...) are not ours
        if self.config.lr == "auto":
            raise ConfigError("Trainer needs a numeric lr; run trainkit.lr_finder.lr_find first (train_run does)")
        self.device = run_device(self.config.device, deterministic=self.config.deterministic, tf32=self.config.tf32)
        self.amp_dtype = autocast_dtype(self.config.precision, self.device)
        self.memory_format = torch.channels_last if self.config.channels_last else torch.contiguous_format
        # how a step runs across processes: one process, DDP or FSDP (trainkit.strategies)
        self.strategy = strategy if strategy is not None else make_strategy(self.config)
        if not isinstance(self.strategy, Strategy):
            raise ConfigError("Trainer's strategy must be a trainkit.strategies.Strategy, "
                              f"got {type(self.strategy).__name__}")  # fmt: skip
        self.rank, self.world_size = self.strategy.rank, self.strategy.world_size
        self.distributed, self.sharded = self.strategy.distributed, self.strategy.sharded
        self.is_main = self.rank == 0  # logs and writes files; other ranks write nothing
        # self.model keeps the plain state_dict keys; the strategy's forward wraps it (DDP, compile)
        prepared = self.strategy.prepare(model.to(self.device), self.config, self.device)
        self.model, self.forward, self.eval_forward = prepared.model, prepared.forward, prepared.eval_forward
        if not prepared.autocast:
            self.amp_dtype = None
        self.task = trainer_task(self.config, task, loss_fn, metrics, step)
        self.callbacks = list(callbacks)
        check_callbacks(self.callbacks)
        warn_about_recipe_settings(self.config, self.callbacks)
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        self.run_info = {**(run_info or {}), "world_size": self.world_size}  # resume needs the same
        self.lr = scaled_lr(self.config)  # config.lr stays as given: checkpoints compare the settings typed
        self.optimizer = optimizer if optimizer is not None else build_optimizer(
            self.config.optimizer,
            self.model,
            lr=self.lr,
            weight_decay=self.config.weight_decay,
            momentum=self.config.momentum,
            fused=self.config.fused_optimizer,
        )  # fmt: skip
        check_user_optimizer(self.optimizer, scheduler, self.model)
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(
            self.device.type, enabled=self.config.precision == "fp16")  # fmt: skip
        if not isinstance(self.scaler, torch.amp.GradScaler):
            raise ConfigError(f"Trainer's scaler must be a torch.amp.GradScaler, got {type(self.scaler).__name__}")
        self.user_scheduler = scheduler
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.swa_scheduler: torch.optim.swa_utils.SWALR | None = None  # replaces the schedule from --swa-start
        self.average = weight_average(self.model, self.config)  # --ema / --swa-start (trainkit.averaging)
        self.train_batches: EpochBatches | None = None
        self.epochs, self.max_steps = self.config.epochs, self.config.max_steps  # fit() settles epochs from the data
        self._validated_this_epoch = False
        self.state = TrainState(model=self.model, eval_model=self._validated_module())
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoints = (
            CheckpointDir(
                self.out_dir / "checkpoints",
                keep_last=self.config.keep_checkpoints,
                keep_every=self.config.keep_every_epochs,
            )
            if self.out_dir is not None
            else None
        )
        writes_files = self.out_dir is not None and self.is_main
        self.history_file = HistoryFile(self.out_dir / "history.csv" if writes_files else None)
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.rollbacks = 0
        self.lr_scale = 1.0
        self.failed_saves = 0  # checkpoint writes that failed (disk full, permissions): reported in the summary
        self.max_skipped_steps = self.config.max_skipped_steps  # None until fit() knows the epoch length
        self._buffers = BufferSnapshot(self.model)
        self.interrupt_reason: str | None = None
        self._meter = self._new_meter()
        self._batches_done = 0  # micro-batches of the current epoch already trained on
        self._pending_position: dict[str, Any] | None = None  # set when resuming mid-epoch
        self._fallback_state: dict[str, Any] | None = None
        # "raise": each step's loss tensor is kept (no device op, no sync) and checked every
        # NONFINITE_CHECK_EVERY steps; _unchecked_from is the optimizer step of the first entry
        self._unchecked_losses: list[torch.Tensor] = []
        self._unchecked_from = 1
        self._labels_checked_at = 0  # the optimizer step up to which the label guard's record was read

    # ----------------------------------------------------------------- fitting
    def fit(
        self,
        train: Any,
        val: Any = None,
        *,
        resume_from: str | Path | dict[str, Any] | None = None,
    ) -> list[dict[str, float]]:
        """Train for ``config.epochs`` epochs or ``config.max_steps`` optimizer steps (early stopping
        may end sooner); returns the history, one row per epoch (and per ``val_every_steps`` point).

        ``train``/``val``: any data ``trainkit.batches.as_epoch_batches`` accepts (a Dataset, a
        DataLoader, an iterable of batches, DeviceBatches). ``resume_from``: a checkpoint path or
        an already loaded checkpoint payload. The output folder (if any) is locked for the whole
        fit: a second process gets a one-line error.
        """
        with explaining_nondeterministic_ops():
            if self.out_dir is None or not self.is_main:
                return self._fit(train, val, resume_from)
            with holding_run_folder(self.out_dir):
                return self._fit(train, val, resume_from)

    def _fit(self, train: Any, val: Any, resume_from: str | Path | dict[str, Any] | None) -> list[dict[str, float]]:
        self._check_data(train, val)
        train = self.train_batches = self._training_batches(train)
        steps_per_epoch = self.steps_per_epoch = math.ceil(len(train) / self.config.accumulate)
        if steps_per_epoch == 0:
            raise ConfigError("the training data yields no batch (is it empty, or smaller than one batch with drop_last?)")
        self.max_steps = self.config.max_steps
        # max_steps, when given, is the budget (as in Keras' steps and Hugging Face's max_steps)
        self.epochs = self.config.epochs if self.max_steps is None else math.ceil(self.max_steps / steps_per_epoch)
        if self.config.swa_start is not None and self.config.swa_start > self.epochs:
            raise ConfigError(f"--swa-start {self.config.swa_start} is after the run's last epoch ({self.epochs}); "
                              f"use an epoch in 1..{self.epochs}")  # fmt: skip
        total_steps = steps_per_epoch * self.epochs if self.max_steps is None else self.max_steps
        self.scheduler = self.user_scheduler or build_scheduler(
            schedule_spec(self.config, steps_per_epoch, total_steps), self.optimizer, total_steps=total_steps
        )
        if self.max_skipped_steps is None:
            self.max_skipped_steps = max(1, math.ceil(DEFAULT_SKIP_FRACTION * steps_per_epoch))
        self._check_monitor(val)
        self.state.eval_model = self._validated_module()
        if resume_from is not None:
            payload = resume_from if isinstance(resume_from, dict) else load_checkpoint(resume_from, weights=False)
            self.load_state_dict(payload)
            log.info("resumed at epoch %d, optimizer step %d", self.state.epoch + 1, self.state.global_step)
        if self.checkpoints is not None and self.is_main:
            remove_stale_temp_files(self.out_dir)
            self.checkpoints.remove_temp_files()
        if self.config.on_nonfinite == "rollback":  # kept in host memory: the run needs the device's
            self._fallback_state = host_copy(self.state_dict())
        self.history_file.rewrite(self.state.history)
        self._call("on_fit_start")
        while self.state.epoch < self.epochs and not self.state.stop_requested and not self._out_of_steps():
            try:
                self._run_epoch(train, val)
            except NonFiniteStep as bad:
                self._roll_back(bad.step)
        if self.state.stop_requested:
            log.info("%s", self.state.stop_reason)
        self._finish_averaging()
        self._call("on_fit_end")
        self.model.eval()
        return self.state.history

    def _training_batches(self, data: Any) -> EpochBatches:
        """The training data as EpochBatches (shuffled by (seed, epoch), this rank's shard)."""
        if self.config.batch_size == "auto":
            raise ConfigError("Trainer needs a numeric batch_size; trainkit.memory.find_batch_size finds one (train_run does)")
        return as_epoch_batches(
            data, batch_size=self.config.batch_size, seed=self.config.seed, shuffle=True, lockstep=True,
            num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda", rank=self.rank,
            world_size=self.world_size, steps_per_epoch=steps_without_length(data, self.config),
        )  # fmt: skip

    def _evaluation_batches(self, data: Any) -> Iterable[Batch]:
        """Evaluation data in order, this rank's shard (a user's loader is taken as it is)."""
        if isinstance(data, LoaderBatches):
            return data.loader
        batches = as_epoch_batches(
            data, batch_size=self.config.eval_batch_size, seed=self.config.seed, shuffle=False, lockstep=False,
            num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda", rank=self.rank,
            world_size=self.world_size, steps_per_epoch=1,
        )  # fmt: skip
        return batches.loader if isinstance(batches, LoaderBatches) else batches.epoch(0)

    def _check_data(self, train: Any, val: Any) -> None:
        """The first samples of each split (whole tensors in memory) checked against the task and
        the model's dtype before any step: labels the loss cannot take, samples that do not stack,
        a lying __len__, float64 features. The label guard's records start afresh."""
        dtype = parameter_dtype(self.model)
        for data, split in ((train, "training"), (val, "validation")):
            if data is not None:
                check_data(self.task, data, f"{self._data_prefix()}{split}", dtype)
        self.task.labels_seen(training=True)  # what the LR finder or batch-size probe left
        self.task.labels_seen(training=False)

    def _data_prefix(self) -> str:
        """'--dataset NAME: ' when the run's recipe named its data (train_run), else nothing."""
        name = self.run_info.get("data_fingerprint", {}).get("dataset")
        return f"--dataset {name}: " if name else ""

    def _training_batch(self) -> str:
        """Where a DataError in the step in progress happened."""
        step, epoch = self.state.global_step + 1, self.state.epoch
        return f"{self._data_prefix()}the training batch of optimizer step {step} (epoch {epoch})"

    def _check_monitor(self, val: Any) -> None:
        """--monitor (and each EarlyStopping's) must name a metric this run produces: refused before
        training, not after its first epoch. A val_ metric without validation data is not tracked."""
        available = self.task.monitorable(LOOP_MONITORABLE)
        available += [name for callback in self.callbacks for name in callback.adds_metrics]
        monitors = [self.config.monitor] + [c.monitor for c in self.callbacks if isinstance(c, EarlyStopping)]
        for monitor in monitors:
            if monitor not in available and not (val is None and monitor.startswith("val_")):
                raise ConfigError(f"--monitor {monitor!r} is not a metric of this run; choose one of {', '.join(available)}")

    def _out_of_steps(self) -> bool:
        return self.max_steps is not None and self.state.global_step >= self.max_steps

    def lr_find(self, train: Any, **options: Any) -> LRFinderResult:
        """LR range test on this trainer's model, optimizer, task, accumulation and precision.

        Leaves no trace (see trainkit.lr_finder); build a new Trainer with the suggested lr.
        """
        return lr_find(self.model, self.optimizer, self._training_batches(train), self.task,
                       accumulate=self.config.accumulate, precision=self.config.precision, **options)  # fmt: skip

    def request_interrupt(self, reason: str) -> None:
        """Ask for a clean stop: finish the current step, save a checkpoint, raise TrainingInterrupted.

        Safe to call from a signal handler: it only sets a flag that the loop reads.
        """
        self.interrupt_reason = reason

    def _run_epoch(self, train: EpochBatches, val: Any) -> None:
        state = self.state
        state.epoch += 1
        self._start_swa_schedule_when_due()
        self._call("on_epoch_start")
        self._row_started = time.perf_counter()
        self._train_one_epoch(train, val)
        if self.average is not None and self.average.kind == "swa" and state.epoch >= self.config.swa_start:
            self.average.update(self.model)  # once per epoch: SWA averages the ends of epochs
        measured = bool(self._meter.steps or self._meter.skipped or not self._validated_this_epoch)
        if measured:  # not when the epoch stopped right after a --val-every-steps row
            self._measure_row(val)
        self._call("on_epoch_end")
        self._agree_on_stop()
        step_metric = getattr(self.scheduler, "step_metric", None)  # reduce-on-plateau
        if step_metric is not None and self.swa_scheduler is None and self.config.monitor in state.metrics:
            step_metric(state.metrics[self.config.monitor])
        if measured:
            self._publish_row(state.metrics)  # after on_epoch_end: what a callback adds is kept
        if not self._weights_finite():  # checked after the callbacks too: nothing non-finite is saved or best
            self._nonfinite_weights()
        saved = self._save_checkpoint(epoch_complete=True, is_best=measured and self._is_new_best(state.metrics))
        self._stop_if_interrupted(saved)

    def _measure_row(self, val: Any) -> dict[str, float]:
        """The metrics since the previous row (training) and now (validation); callbacks see them
        at on_validation_end. Starts the next row's sums from zero."""
        state = self.state
        train_metrics = self._meter.results()
        train_metrics.update(self._derived("train_", train_metrics))
        metrics: dict[str, Any] = {"epoch": state.epoch}
        if self.config.val_every_steps:
            metrics["step"] = state.global_step
        metrics.update((k, v) for k, v in train_metrics.items() if k.startswith("train_"))
        if val is not None and has_samples(val):
            metrics.update((f"val_{k}", v) for k, v in self._validate(val).items())
        seconds = time.perf_counter() - self._row_started
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics.update((k, v) for k, v in train_metrics.items() if not k.startswith("train_"))
        metrics.update(epoch_seconds=seconds, samples_per_second=self._meter.total_rows / seconds)
        metrics = distributed.broadcast_object(metrics)  # rank 0's numbers everywhere: same decisions
        self._warn_if_validation_nonfinite(metrics)
        state.metrics = metrics
        state.history.append(metrics)
        self._call("on_validation_end")
        self._meter = self._new_meter()
        self._row_started = time.perf_counter()
        return metrics

    def _validate(self, val: Any) -> dict[str, float]:
        """evaluate() on the validation data; its DataErrors say which validation."""
        try:
            return self.evaluate(val)
        except DataError as exc:
            where = f"{self._data_prefix()}validation after {self._position()}"
            raise DataError(f"{where}: {data_error_text(exc)}") from None

    def _position(self) -> str:
        """'epoch 2' (with --val-every-steps: 'epoch 2, optimizer step 40')."""
        step = f", optimizer step {self.state.global_step}" if self.config.val_every_steps else ""
        return f"epoch {self.state.epoch}{step}"

    def _warn_if_validation_nonfinite(self, metrics: dict[str, Any]) -> None:
        """A NaN/inf validation metric is not a measurement: say so once per validation, and what
        ignores it, instead of letting it pass silently through history, early stopping and the schedule."""
        bad = [f"{name} {value}" for name, value in metrics.items()
               if name.startswith("val_") and isinstance(value, float) and not math.isfinite(value)]  # fmt: skip
        if not bad or not self.is_main:
            return
        effects = ["it never counts as the best"]
        if any(isinstance(callback, EarlyStopping) for callback in self.callbacks):
            effects.append("early stopping counts it as a validation without improvement")
        if callable(getattr(self.scheduler, "step_metric", None)):
            effects.append("the plateau schedule skips it")
        log.warning("validation after %s gave %s: %s; look for NaN/inf in the validation data, or batches "
                    "whose labels are all the ignore index", self._position(), ", ".join(bad), ", ".join(effects))

    def _new_meter(self) -> EpochMeter:
        return EpochMeter(self.device, self.task.new_metrics(), scaled=self.scaler.is_enabled())

    def _publish_row(self, metrics: dict[str, float]) -> None:
        self.history_file.append(metrics, self.state.history)
        log.info("%s", format_epoch(metrics, self.epochs))

    def _derived(self, prefix: str, metrics: dict[str, float]) -> dict[str, float]:
        plain = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
        return {prefix + k: v for k, v in self.task.derived(plain).items()}

    def _train_one_epoch(self, train: EpochBatches, val: Any) -> None:
        self.model.train()
        self._meter = self._new_meter()
        self._batches_done = 0
        self._validated_this_epoch = False
        if self._pending_position is not None:
            if self._pending_position["meter"] is not None:  # None: a rank added by a world-size change
                self._meter.load_state_dict(self._pending_position["meter"])
            self._batches_done = self._pending_position["batches_done"]
            self._validated_this_epoch = self._pending_position.get("validated", False)
            self._pending_position = None
        steps = math.ceil(len(train) / self.config.accumulate)
        progress = tqdm(total=steps, initial=self._batches_done // self.config.accumulate,
                        desc=f"epoch {self.state.epoch}", leave=False,
                        disable=None if self.is_main else True)  # fmt: skip
        every, val_every = self.config.checkpoint_every_steps, self.config.val_every_steps
        global_samples = getattr(train, "global_samples", None) if self.distributed else None
        batches = labelled_as_data(train.epoch(self.state.epoch, self._batches_done), self._training_batch)
        self._labels_checked_at = self.state.global_step
        for group in group_batches(batches, self.config.accumulate):
            known = global_samples(self._batches_done, len(group)) if global_samples is not None else None
            try:
                loss = self._optimizer_step(group, known)
            except DataError as exc:
                raise DataError(f"{self._training_batch()}: {exc}") from None
            self._batches_done += len(group)
            self.state.global_step += 1
            self._call("on_batch_end", loss)
            progress.update()
            crash_point("step")
            interrupted, stop_now = self._agree_on_interrupt_and_stop()
            ending = stop_now or self._out_of_steps()
            mid_epoch = self._batches_done < len(train) and not ending
            validate = mid_epoch and val_every and self.state.global_step % val_every == 0
            is_best = validate and self._validate_mid_epoch(val)
            if mid_epoch and (interrupted or validate or (every and self.state.global_step % every == 0)):
                saved = self._save_checkpoint(epoch_complete=False, is_best=is_best)
                if interrupted:
                    self._raise_interrupted(saved)
            if self.state.global_step % NONFINITE_CHECK_EVERY == 0:
                self._check_recent_steps(steps)
            if ending or (validate and self.state.stop_requested):
                break
        progress.close()
        self._check_recent_steps(steps)

    def _validate_mid_epoch(self, val: Any) -> bool:
        """A --val-every-steps point: a history row, early stopping's look, maybe a new best."""
        metrics = self._measure_row(val)
        self._validated_this_epoch = True
        self._agree_on_stop()
        self._publish_row(metrics)
        self.model.train()
        return self._weights_finite() and self._is_new_best(metrics)

    def _agree_on_interrupt_and_stop(self) -> tuple[bool, bool]:
        """Stop now? A signal or a callback's "stop now" may reach ranks at different steps: under
        DDP, one rank's flag stops them all at the same step (one all-reduce for both)."""
        return distributed.any_ranks(self.interrupt_reason is not None, self.state.stop_now)

    def _optimizer_step(self, group: list[Batch], global_samples: int | None = None) -> torch.Tensor:
        """One optimizer step over an accumulation group; returns the group's mean loss.

        ``global_samples``: the group's rows over all ranks when the data knows it without asking
        (DeviceBatches, DatasetBatches): see ``Strategy.group_size``.
        """
        self.strategy.before_step(self.model)  # agreement point (FSDP): the ranks' buffers agree
        self._buffers.take()
        while True:
            try:
                on_device = [to_device(batch, self.device, self.memory_format) for batch in group]
                group_loss, group_size, weight, observed = self._accumulate_gradients(on_device, global_samples)
                break
            except torch.OutOfMemoryError:
                pass  # the traceback holds the partial graph: free it after leaving this block
            on_device = None  # the failed try's device copy, freed before the retry
            self._back_off_after_oom(group, mid_reduction=self._reducing)
            self._reducing = False
        with phase("optimizer"):
            self.scaler.unscale_(self.optimizer)
            overflowed = overflow(self.scaler, self.optimizer, self.device)  # fp16: this step will be skipped
            grad_norm, clipped = masked_by_overflow(*self._clip_gradients(), overflowed)
            if self._is_nonfinite_step(group_loss, grad_norm):
                self._skip_step()
                return group_loss
            for output in observed:  # only now is the group known to count (no OOM retry, not skipped)
                self._observe(output)
            rows = sum(batch_rows(batch) for batch in group)
            self._meter.add_step(group_loss, group_size, weight, rows, grad_norm, clipped, overflowed)
            self.state.lr = self.optimizer.param_groups[0]["lr"]
            self._call("on_before_optimizer_step", grad_norm)
            self._update_weights()
            self.scaler.update()
            if self.average is not None and self.average.kind == "ema":
                self.average.update(self.model)
            self._step_schedule()
        return group_loss

    def _step_schedule(self) -> None:
        (self.swa_scheduler or self.scheduler).step()

    def _accumulate_gradients(
        self, group: list[Batch], global_samples: int | None
    ) -> tuple[torch.Tensor, Any, Any, list[StepOutput]]:
        """Forward and backward over the group's micro-batches.

        Returns (group mean loss, group size the shares were taken of, this rank's sample count,
        the step outputs whose metrics are still to be counted: an out-of-memory retry or a
        skipped step must not count them twice, or at all).
        """
        self.optimizer.zero_grad(set_to_none=True)
        micro_batches = split_micro_batches(group, self.micro_batch_size)
        counts = [self.task.samples(batch) for batch in micro_batches]
        weight = sum(counts)
        # agreement point (DDP, FSDP): the group's samples over all ranks, unless the data knows them
        group_size = self.strategy.group_size(weight, counts, micro_batches, global_samples, self.device)
        group_loss: torch.Tensor | None = None
        deferred: list[StepOutput] = []
        for index, (batch, count) in enumerate(zip(micro_batches, counts)):
            with self.strategy.gradient_sync(index == len(micro_batches) - 1):  # reduced in the last backward only
                with phase("forward"), self._autocast():
                    output = self.task.step(self.forward, batch)
                # Mean loss of the micro-batch, weighted by its share of the group: the sum over
                # the group equals the mean loss of one big batch, even for a short last group.
                share = output.loss * (count / group_size)
                # an OOM in a backward that all-reduces (DDP's last) leaves the ranks mid-reduction
                self._reducing = self.strategy.reduces_in_backward(index == len(micro_batches) - 1)
                with phase("backward"):
                    self.scaler.scale(share).backward()
                self._reducing = False
            group_loss = share.detach() if group_loss is None else group_loss + share.detach()
            deferred.append(detached(output))
        return group_loss, group_size, weight, deferred

    def _observe(self, output: StepOutput) -> None:
        """Count a micro-batch in the epoch's metrics; callbacks see the latest at on_batch_end."""
        if output.outputs is not None and output.targets is not None:
            self._meter.metrics.update(output.outputs, output.targets)
        self.state.step_output = output

    def _back_off_after_oom(self, group: list[Batch], *, mid_reduction: bool = False) -> None:
        """Out of memory in the device copy, a forward or a backward: halve the micro-batch for the
        rest of training; the caller retries the group from its first micro-batch.

        The group (effective batch, data order, loss weighting) stays the same: only the number
        of forward/backward passes it takes grows. What the failed try did is undone first: its
        gradients, and the BatchNorm statistics its forwards updated (its metrics were not counted).

        DDP/FSDP agreement point: every rank must back off together. Ranks with the same shapes run
        out together and all retry; a rank that ran out alone (the others are inside this step's
        collectives), or DDP interrupted mid-reduction (``mid_reduction``: it cannot start another),
        stops the run with one line instead of hanging.
        """
        step = self.state.global_step + 1
        if self.distributed:
            advice = ("resume with a smaller --batch-size (and --accumulate to keep the effective batch), "
                      "--grad-checkpointing or --precision bf16")  # fmt: skip
            if mid_reduction:
                raise TrainkitError(f"out of memory at step {step} on rank {self.rank} in the backward pass that "
                                    f"all-reduces DDP's gradients, which cannot be retried; {advice}")  # fmt: skip
            if not distributed.every_rank_out_of_memory():
                raise TrainkitError(f"out of memory at step {step} on rank {self.rank} but not on every rank, so the "
                                    f"micro-batch cannot be halved in step; {advice}")  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        self._buffers.restore()
        free_cached_device_memory(self.device)
        full_batch = max(batch_rows(batch) for batch in group)
        current = min(self.micro_batch_size or full_batch, full_batch)
        if current <= 1:
            raise TrainkitError(
                f"out of memory at step {step} even with a micro-batch of 1; use a smaller model, "
                f"--grad-checkpointing, --precision bf16 or a device with more memory"
            )
        self.micro_batch_size = (current + 1) // 2
        micro_batches_per_step = self.config.accumulate * math.ceil(full_batch / self.micro_batch_size)
        log.warning(
            "out of memory at step %d with micro-batch %d: continuing with micro-batches of %d x accumulation %d",
            step, current, self.micro_batch_size, micro_batches_per_step,
        )  # fmt: skip

    def _update_weights(self) -> None:
        """The optimizer step (through the GradScaler). Its first step allocates the optimizer's
        state (AdamW: two copies of the weights): out of memory there, the partial state is dropped
        and the step retried once after freeing cached memory; any other out-of-memory in the
        update is one line (the update may be half applied, so the run cannot go on from it)."""
        first_step = not self.optimizer.state
        try:
            self.scaler.step(self.optimizer)
            return
        except torch.OutOfMemoryError:
            pass  # the traceback holds partial state: free it after leaving this block
        step = self.state.global_step + 1
        if first_step:
            self.optimizer.state.clear()
            free_cached_device_memory(self.device)
            try:
                self.scaler.step(self.optimizer)
                return
            except torch.OutOfMemoryError:
                self.optimizer.state.clear()
        what = (f"allocating its state ({type(self.optimizer).__name__} keeps copies of the weights)" if first_step
                else "mid-update, so the weights may be half updated: resume from the last checkpoint")  # fmt: skip
        raise TrainkitError(f"out of memory in the optimizer step at step {step}, {what}; use a smaller model, "
                            f"--optimizer sgd, --strategy fsdp or a device with more memory")  # fmt: skip

    def _clip_gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip by value and/or norm; return the pre-clip total norm and whether anything was clipped."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        clip_value, clip_norm = self.config.clip_value, self.config.clip_norm
        # under FSDP the norms of sharded gradients are DTensors: full_value all-reduces them
        if clip_value is not None or clip_norm is None:
            pre_clip_norm = fsdp.full_value(torch.nn.utils.get_total_norm(grads, foreach=True))
        clipped = None
        if clip_value is not None:
            clipped = fsdp.full_value(torch.nn.utils.get_total_norm(grads, math.inf, foreach=True)) > clip_value
            torch.nn.utils.clip_grad_value_(params, clip_value, foreach=True)
        if clip_norm is not None:
            # the norm before this clipping (what clip_grad_norm_ computes): the pre-clip norm unless value-clipping ran first
            norm = fsdp.full_value(torch.nn.utils.get_total_norm(grads, foreach=True))
            torch.nn.utils.clip_grads_with_norm_(params, clip_norm, norm, foreach=True)
            clipped = norm > clip_norm if clipped is None else clipped | (norm > clip_norm)
            if clip_value is None:
                pre_clip_norm = norm
        if clipped is None:  # no clipping configured
            clipped = torch.zeros((), device=self.device, dtype=torch.bool)
        return pre_clip_norm, clipped

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------ non-finite losses
    def _is_nonfinite_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Under "raise", only flag it on the device (read every few steps, no sync);
        "skip"/"rollback" must decide now, at the cost of one sync per step."""
        step = self.state.global_step + 1
        if self.config.on_nonfinite == "raise":
            if not self._unchecked_losses:
                self._unchecked_from = step
            self._unchecked_losses.append(loss)
            return False
        finite = torch.isfinite(loss)
        if not self.scaler.is_enabled():  # with fp16, inf gradients are the GradScaler's business
            finite &= torch.isfinite(grad_norm)
        if distributed.every_rank(bool(finite)):  # DDP: all ranks skip or roll back together
            return False
        self.scaler.update()  # closes this step's GradScaler bookkeeping (no-op without fp16)
        if self.config.on_nonfinite == "rollback":
            raise NonFiniteStep(step)
        log.warning("non-finite loss or gradient at optimizer step %d: step skipped", step)
        return True

    def _skip_step(self) -> None:
        """Drop this step's gradients and undo its forward pass's buffer updates (BatchNorm
        statistics); the schedule still advances so later steps keep their lr. Past
        ``--max-skipped-steps`` in the run, stop like "raise": a run that skips most steps learns nothing."""
        self.optimizer.zero_grad(set_to_none=True)
        self._buffers.restore()
        self._meter.skipped += 1
        self._step_schedule()
        skipped = self._meter.skipped + sum(int(row.get("skipped_steps", 0)) for row in self.state.history)
        if skipped > self.max_skipped_steps:
            raise NonFiniteLossError(
                f"{skipped} optimizer steps had a NaN/inf loss or gradient and were skipped, more than "
                f"--max-skipped-steps {self.max_skipped_steps}; training stopped at step {self.state.global_step + 1}. "
                f"Earlier checkpoints are intact. Try a lower --lr or --clip-norm."
            )

    def _nonfinite_weights(self) -> None:
        """NaN/inf in the weights or buffers after an epoch: roll back, or stop (never saved or exported)."""
        if self.config.on_nonfinite == "rollback":
            raise NonFiniteStep(self.state.global_step)
        raise NonFiniteLossError(
            f"the weights or buffers hold NaN/inf after epoch {self.state.epoch} (optimizer step "
            f"{self.state.global_step}); training stopped and nothing was saved from it. Earlier checkpoints "
            f"are intact. Try a lower --lr, --clip-norm or --on-nonfinite rollback."
        )

    def _first_nonfinite_step(self) -> int:
        """The earliest logged step whose loss is NaN/inf, on any rank (-1: none); empties the log.

        Under DDP the minimum over ranks is taken, so all ranks raise at the same check.
        """
        never = torch.iinfo(torch.long).max
        step = never
        if self._unchecked_losses:
            bad = (~torch.isfinite(torch.stack(self._unchecked_losses))).nonzero()
            if len(bad):
                step = self._unchecked_from + int(bad[0])
            self._unchecked_losses = []
        if self.distributed:
            step = int(distributed.all_reduce_min(torch.tensor(step, device=self.device)).item())
        return -1 if step == never else step

    def _check_recent_steps(self, steps_per_epoch: int) -> None:
        """Every NONFINITE_CHECK_EVERY optimizer steps and at each epoch's end: labels the loss could
        not take (LabelGuard), then NaN/inf losses, explained by a batch with no target when there was one."""
        batches = (f"a training batch of epoch {self.state.epoch} "
                   f"(optimizer steps {self._labels_checked_at + 1}-{self.state.global_step})")  # fmt: skip
        seen = self._raise_if_labels_outside(f"{self._data_prefix()}{batches}", training=True)
        self._labels_checked_at = self.state.global_step
        self._raise_if_nonfinite(steps_per_epoch, no_target=batches if seen is not None and seen.no_target else None)

    def _raise_if_labels_outside(self, batches: str, *, training: bool) -> LabelsSeen | None:
        """One DataError when the label guard saw a label outside the model's classes (on any rank:
        all ranks stop together); returns what it saw (None: nothing, or a task without the guard)."""
        if self.task.label_guard is None:  # the same on every rank: no collective needed
            return None
        seen = self.task.labels_seen(training)
        problem = None if seen is None else seen.out_of_range()
        if distributed.any_rank(problem is not None):
            raise DataError(f"{batches} holds {problem or 'a label outside the model classes (on another rank)'}")
        return seen

    def _raise_if_nonfinite(self, steps_per_epoch: int, no_target: str | None = None) -> None:
        """``no_target``: the batches since the last check, when one of them had no target: that,
        not the lr, is why the loss is NaN."""
        step = self._first_nonfinite_step()
        if step < 0:
            return
        if no_target is not None:
            raise DataError(f"{self._data_prefix()}the training loss became NaN at optimizer step {step}: "
                            f"{no_target_text(no_target, self.task.label_guard.ignore_index)}")  # fmt: skip
        raise NonFiniteLossError(
            f"the training loss became NaN/inf at optimizer step {step} (epoch {self.state.epoch}, "
            f"step {step - (self.state.epoch - 1) * steps_per_epoch} of the epoch); training stopped. "
            f"Earlier checkpoints are intact. Try a lower --lr, --clip-norm, --on-nonfinite skip/rollback, "
            f"or --precision fp32."
        )

    def _roll_back(self, step: int) -> None:
        """Reload the newest good checkpoint and continue from it with a lower learning rate."""
        if self.rollbacks >= self.config.max_rollbacks:
            raise NonFiniteLossError(
                f"the training loss became NaN/inf at optimizer step {step} again after "
                f"{self.rollbacks} rollbacks (--max-rollbacks); giving up. Lower --lr or check the data."
            )
        found = (self.checkpoints.newest_valid(set_aside=self.is_main, weights=False)
                 if self.checkpoints is not None else None)  # fmt: skip
        source, payload = found if found is not None else ("the state at the start of fit()", self._fallback_state)
        rollbacks, target_scale = self.rollbacks + 1, self.lr_scale * self.config.rollback_lr_factor
        self.load_state_dict(payload)
        scale_learning_rate(self.optimizer, self.scheduler, target_scale / self.lr_scale)
        self.rollbacks, self.lr_scale = rollbacks, target_scale
        log.warning(
            "non-finite loss at optimizer step %d: rolled back to %s (step %d) and scaled the lr by %g "
            "(rollback %d of at most %d)",
            step, source, self.state.global_step, target_scale, rollbacks, self.config.max_rollbacks,
        )  # fmt: skip

    # ------------------------------------------------------- weight averaging
    def _validated_module(self) -> nn.Module:
        """What validation measures during training: the EMA (unless --no-eval-average), else the model.
        SWA's average is measured only at the end, once its BatchNorm statistics are recomputed."""
        if self.average is not None and self.average.kind == "ema" and self.config.eval_average:
            return self.average.module
        return self.model

    def _start_swa_schedule_when_due(self) -> None:
        """From --swa-start on, SWALR anneals the lr to --swa-lr over one epoch and holds it."""
        if self.config.swa_lr is not None and self.swa_scheduler is None and self.state.epoch >= self.config.swa_start:
            self.swa_scheduler = self._swa_schedule()

    def _swa_schedule(self) -> torch.optim.swa_utils.SWALR:
        return torch.optim.swa_utils.SWALR(self.optimizer, swa_lr=self.config.swa_lr * self.lr_scale,
                                           anneal_epochs=self.steps_per_epoch, anneal_strategy="cos")  # fmt: skip

    def _finish_averaging(self) -> None:
        """The average becomes the final weights (what the test, predict and the exports see): the
        EMA as it is, SWA after torch's update_bn over one pass of the training data."""
        average = self.average
        if self._average_is_final():
            if average.kind == "swa":
                self.swa_applied = True
                batches = (to_device(b, self.device, self.memory_format) for b in self.train_batches.epoch(self.state.epoch + 1))
                with self._autocast():
                    average.refresh_batch_norm(batches, lambda module, batch: self.task.forward(module, self.task.split(batch)[0]))
            self.model.load_state_dict(average.module.state_dict())
        self.state.eval_model = self.model

    def _average_is_final(self) -> bool:
        """Whether fit ends with the weight average as the model's weights."""
        return self.average is not None and self.config.eval_average and self.average.updates > 0

    def describe_final_weights(self, restored_epoch: int | None) -> str:
        """What the final weights are, for the summary."""
        if not self._average_is_final():
            what = "the weights"
        elif self.average.kind == "ema":
            what = f"the EMA of the weights (decay {self.config.ema:g})"
        else:
            what = f"the SWA average of epochs {self.config.swa_start}-{self.state.epoch} (BatchNorm statistics recomputed)"
        when = "last epoch" if restored_epoch is None else f"best epoch {restored_epoch} (restored by early stopping)"
        return f"{what} at the {when}"

    # -------------------------------------------------------------- evaluation
    @torch.inference_mode()
    def evaluate(self, data: Any, model: nn.Module | None = None) -> dict[str, float]:
        """The task's loss and metrics in eval mode (BatchNorm running stats, no dropout).

        ``data``: anything ``fit`` accepts. ``model``: what to evaluate (default: what validation
        measures, the EMA under --ema; after fit, the final weights). Under DDP each rank evaluates
        its shard with rank 0's BatchNorm statistics and the sums are all-reduced, so every rank
        returns the same numbers.
        """
        module = self.state.eval_model if model is None else model
        forward = self.eval_forward if module is self.model else module
        module.eval()
        distributed.broadcast_buffers(module)
        self.task.labels_seen(training=False)  # what an earlier evaluation left
        metrics = self.task.new_metrics()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        weight: Any = 0
        rows = 0
        for whole, counted in self.strategy.in_lockstep(self._evaluation_batches(data)):
            for batch, output in self._evaluated_pieces(forward, whole):
                if not counted:
                    continue
                count = self.task.samples(batch)
                loss_sum += output.loss.double() * count
                if output.outputs is not None and output.targets is not None:
                    metrics.update(output.outputs, output.targets)
                weight = weight + count
                rows += batch_rows(batch)
            crash_point("validation")
        weight = weight if isinstance(weight, torch.Tensor) else loss_sum.new_tensor(float(weight))
        totals = torch.stack([loss_sum, weight.to(loss_sum), loss_sum.new_tensor(float(rows))])
        loss_total, weight_total, rows = distributed.all_reduce_sum(totals).tolist()
        if rows == 0:
            raise TrainkitError("cannot evaluate on an empty dataset")
        self._raise_if_labels_outside("a batch", training=False)
        results = {"loss": loss_total / weight_total if weight_total else math.nan}
        results.update(metrics.results(distributed.all_reduce_sum, device=self.device))
        results.update(self.task.derived(results))
        return results

    def _evaluated_pieces(self, forward: Callable[..., Any], batch: Batch) -> Iterator[tuple[Batch, StepOutput]]:
        """(piece, step output) for an evaluation batch: the whole batch, or after running out of
        memory, pieces of half the rows (and half again...) from then on. Loss and metrics are sums
        over samples, so the pieces add up to the whole batch's numbers. Under FSDP every forward
        is a collective the other processes are in: one line instead."""
        for piece in split_micro_batches([batch], self.eval_micro_batch_size):
            try:
                piece = to_device(piece, self.device, self.memory_format)
                with self._autocast():
                    output = self.task.step(forward, piece)
            except torch.OutOfMemoryError:
                output = None  # the traceback holds the partial forward: handled after leaving this block
            if output is not None:
                yield piece, output
                continue
            self._halve_evaluation_batch(batch_rows(piece))
            yield from self._evaluated_pieces(forward, piece)

    def _halve_evaluation_batch(self, rows: int) -> None:
        if self.sharded or rows <= 1:
            raise TrainkitError(f"out of memory evaluating a batch of {rows} row(s)"
                                + (" under --strategy fsdp" if self.sharded else "")
                                + "; lower --eval-batch-size or use a device with more memory")  # fmt: skip
        free_cached_device_memory(self.device)
        self.eval_micro_batch_size = (rows + 1) // 2
        log.warning("out of memory evaluating %d rows at once: evaluating in pieces of %d from now on",
                    rows, self.eval_micro_batch_size)  # fmt: skip

    @torch.inference_mode()
    def predict(self, data: Any, batch_size: int | None = None) -> Any:
        """The model's outputs for ``data`` (a tensor of inputs, or anything ``fit`` accepts; targets
        in it are ignored), concatenated along the first dimension in host memory. Refuses a model
        in training mode: its outputs would be wrong."""
        if self.model.training:
            raise TrainkitError(
                "predict() refuses a model in training mode (dropout active, BatchNorm using batch "
                "statistics); call model.eval() first"
            )
        outputs = []
        for inputs, counted in self.strategy.in_lockstep(self._prediction_inputs(data, batch_size or self.config.eval_batch_size)):
            with self._autocast():
                produced = self.task.forward(self.eval_forward, to_device(inputs, self.device, self.memory_format))
            if not counted:
                continue
            logits = model_logits(produced) if model_loss(produced) is not None else produced
            # on the host as they come: device memory does not grow with the data, and the result is NumPy-ready
            outputs.append(to_host(map_tensors(lambda t: t.float() if t.is_floating_point() else t, logits)))
        if not outputs:
            raise TrainkitError("predict() got no data")
        return concatenate(outputs)

    def _prediction_inputs(self, data: Any, batch_size: int) -> Iterator[Any]:
        if isinstance(data, torch.Tensor):
            for start in range(0, len(data), batch_size):
                yield data[start : start + batch_size]
            return
        for batch in self._evaluation_batches(data):
            yield self.task.split(batch)[0]

    # ------------------------------------------------------------ checkpoints
    def state_dict(self, *, epoch_complete: bool = True) -> dict[str, Any]:
        """Everything needed to continue this run (plain data: loads with weights_only=True).

        ``epoch`` is the epoch in progress (or just completed); ``position`` says how far into
        it training got, with the epoch's running metrics, so a mid-epoch resume is exact.
        """
        position = None if epoch_complete else {
            "batches_done": self._batches_done, "meter": self._meter.state_dict(), "validated": self._validated_this_epoch,
        }  # fmt: skip
        rng = rng_state(self.device)
        payload = {
            "format": "trainkit-checkpoint",
            "format_version": 2,
            "versions": {"trainkit": trainkit.__version__, "torch": str(torch.__version__)},
            "config": self.config.loop_settings(),  # the recipe's settings, if any, are in run_info
            "run_info": self.run_info,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "swa_scheduler": self.swa_scheduler.state_dict() if self.swa_scheduler is not None else None,
            "average": self.average.state_dict() if self.average is not None else None,
            "scaler": self.scaler.state_dict(),
            "epoch": self.state.epoch,
            "position": position,
            "global_step": self.state.global_step,
            "history": self.state.history,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            "failed_saves": self.failed_saves,
            "stop": {"requested": self.state.stop_requested, "reason": self.state.stop_reason},
            "callbacks": {key: callback.state_dict() for key, callback in zip(callback_keys(self.callbacks), self.callbacks)},
            "data": self.train_batches.state_dict() if hasattr(self.train_batches, "state_dict") else None,
            "rng": rng,
        }
        if self.distributed:  # each rank's dropout stream and running sums, for an exact resume
            meter = to_host(self._meter.state_dict())
            payload["per_rank"] = distributed.gather_objects({"rng": rng, "meter": meter})
        return payload

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """Restore a checkpoint's state; parts that do not fit this run are one CheckpointError."""
        own = self._rank_state(payload)
        mismatch = state_dict_mismatch(self.model, payload["model"])
        if mismatch is not None:
            raise CheckpointError(f"the checkpoint's weights do not fit this model ({mismatch}): it was written "
                                  f"for another --model or --hidden")  # fmt: skip
        try:
            self._restore(payload, own)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"the checkpoint's state does not fit this run ({problem})") from None

    def _rank_state(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """This rank's RNG streams and the epoch's running sums: its own, on the world size that wrote
        them. On another one (N processes' checkpoint resumed on M): the weights, optimizer, schedule,
        counters and the data position (in global batches, each epoch's order a function of (seed,
        epoch)) carry over; rank 0 takes the ranks' summed running sums, and every rank starts new
        dropout/augmentation streams: the run continues, but not bit for bit."""
        saved_world = payload.get("run_info", {}).get("world_size", 1)
        if saved_world == self.world_size:
            return payload["per_rank"][self.rank] if "per_rank" in payload else None
        if isinstance(self.train_batches, LoaderBatches):
            raise CheckpointError(
                f"this checkpoint was written by {saved_world} process(es) but {self.world_size} are running, and "
                f"your DataLoader's position is per process; resume with {saved_world} (torchrun --nproc_per_node)"
            )
        meter = None
        if payload["position"] is not None and self.rank == 0:
            ranks = payload.get("per_rank") or [{"meter": payload["position"]["meter"]}]
            meter = merged_meter_state([saved["meter"] for saved in ranks])
        log.warning("resuming a checkpoint of %d process(es) on %d: training continues from optimizer step %d with "
                    "the same data order, but not bit for bit (new per-process dropout and augmentation streams)",
                    saved_world, self.world_size, payload["global_step"])  # fmt: skip
        return {"rng": None, "meter": meter}

    def _restore(self, payload: dict[str, Any], own: dict[str, Any] | None) -> None:
        callbacks = self._restore_weights(payload)
        if self.scheduler is not None and payload["scheduler"] is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        self.swa_scheduler = None
        if payload.get("swa_scheduler") is not None:
            self.swa_scheduler = self._swa_schedule()
            self.swa_scheduler.load_state_dict(payload["swa_scheduler"])
        if self.average is not None:  # a checkpoint without one (--force-resume adding --ema): start afresh
            fresh = {"kind": self.average.kind, "updates": 0, "weights": self.model.state_dict()}
            self.average.load_state_dict(payload.get("average") or fresh)
        self.scaler.load_state_dict(payload["scaler"])
        position = payload["position"]
        if position is not None and own is not None:
            position = {**position, "meter": own["meter"]}
        # mid-epoch: the loop re-enters the epoch in progress and skips the batches already done
        self.state.epoch = payload["epoch"] - (1 if position is not None else 0)
        self._pending_position = position
        self.state.global_step = payload["global_step"]
        self.state.history = list(payload["history"])
        self.state.metrics = self.state.history[-1] if self.state.history else {}
        self.best_metric, self.best_epoch = payload["best_metric"], payload["best_epoch"]
        self.rollbacks, self.lr_scale = payload["rollbacks"], payload["lr_scale"]
        self.failed_saves = payload.get("failed_saves", 0)
        stop = payload.get("stop", {"requested": False, "reason": ""})
        self.state.stop_requested, self.state.stop_reason = stop["requested"], stop["reason"]
        for key, callback in zip(callback_keys(self.callbacks), self.callbacks):
            saved = callbacks.get(key, callbacks.get(type(callback).__name__))  # older keys
            if saved:
                callback.load_state_dict(saved)
        if payload.get("data") and hasattr(self.train_batches, "load_state_dict"):
            self.train_batches.load_state_dict(payload["data"])  # a StatefulDataLoader's position
        rng = own["rng"] if own is not None else payload["rng"]
        if rng is None:  # another world size: streams of (seed, step, rank)
            seed = distributed.rank_seed(self.config.seed + payload["global_step"], self.rank)
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            return
        restore_rng(rng, self.device)

    def _restore_weights(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Model and optimizer state; returns the callbacks' saved states (with their weight copies).

        A sharded checkpoint (a folder) is read through torch.distributed.checkpoint, which
        reshards it onto this run's processes, sharded or not; a one-file checkpoint goes into a
        sharded model as whole tensors that each rank cuts its shards from.
        """
        if "sharded" in payload:
            model_state, optimizer_state = fsdp.sharded_state(self.model, self.optimizer)
            copies = {key: {name: torch.empty_like(value) for name, value in model_state.items()}
                      for key in sharded_copies(payload["callbacks"])}  # fmt: skip
            load_into(Path(payload["sharded"]), {"model": model_state, "optimizer": optimizer_state, **copies})
            fsdp.restore_sharded_state(self.model, self.optimizer, model_state, optimizer_state)
            return with_copies(payload["callbacks"], copies)
        if self.sharded and not fsdp.holds_dtensors(payload["model"]):
            fsdp.restore_full_state(self.model, self.optimizer, payload["model"], payload["optimizer"])
            return fsdp.shard_weight_copies(payload["callbacks"], self.model.state_dict())
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        return payload["callbacks"]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's whole state_dict (for exports); under FSDP a collective that gathers it on
        rank 0's CPU, the other ranks getting an empty dict."""
        return self.strategy.full_state_dict(self.model)

    def _is_new_best(self, metrics: dict[str, float]) -> bool:
        """Best by the same rule as early stopping (monitor, mode, min_delta), so both agree."""
        value = metrics.get(self.config.monitor)
        if value is None or not is_improvement(value, self.best_metric, self.config.monitor_mode, self.config.min_delta):
            return False
        self.best_metric, self.best_epoch = value, self.state.epoch
        return True

    def _weights_finite(self) -> bool:
        """No NaN/inf in the weights or buffers, on every rank (all ranks then decide alike)."""
        return distributed.every_rank(all_finite(fsdp.local_state(self.model.state_dict())))

    def _save_checkpoint(self, *, epoch_complete: bool, is_best: bool) -> Path | None:
        """Save unless the weights are non-finite; a failed save never loses earlier checkpoints.

        Under DDP every rank builds the payload (it gathers per-rank state) and learns the
        outcome of rank 0's write, so a failed save stops all ranks or none.
        """
        if self.checkpoints is None:
            return None
        if not self._weights_finite():
            log.error("not saving a checkpoint at step %d: the weights hold NaN/inf", self.state.global_step)
            return None
        payload = self.state_dict(epoch_complete=epoch_complete)
        step = None if epoch_complete else self.state.global_step
        if self.sharded:  # every rank writes its shards (trainkit.checkpoint.sharded), rank 0 commits
            distributed.broadcast_buffers(self.model)  # DCP writes one rank's copy of each buffer: rank 0's
            payload["model"], payload["optimizer"] = fsdp.sharded_state(self.model, self.optimizer)
            path, message = self._write_checkpoint(payload, step, is_best)
        else:
            path, message = self._write_checkpoint(payload, step, is_best) if self.is_main else (None, None)
        path, message = distributed.broadcast_object((path, message))
        if message is None:
            return path
        self.failed_saves += 1
        if self.config.on_save_error == "stop":
            raise CheckpointError(message)
        log.error("%s; training continues (--on-save-error stop to stop instead)", message)
        return path  # the epoch's own file may have been written even when best.pt was not

    def _write_checkpoint(self, payload: dict[str, Any], step: int | None, is_best: bool) -> tuple[Path | None, str | None]:
        """Rank 0 (every rank, for a sharded one) writes the checkpoint, then best.pt; disk full,
        permissions and I/O errors come back as a message (the old files stay intact), naming which
        of the two failed."""
        at = f"at step {self.state.global_step}"
        try:
            path = self.checkpoints.save(payload, epoch=self.state.epoch, step=step)
        except Exception as exc:
            return None, f"could not save a checkpoint {at}: {exc}; earlier checkpoints are intact"
        if not is_best:
            return path, None
        try:
            self.checkpoints.save_best(payload)
        except Exception as exc:
            best = self.checkpoints.best_path.name
            return path, f"saved {path.name} but could not update {best} {at}: {exc}; the previous {best} is intact"
        return path, None

    def _interrupt_agreed(self) -> bool:
        """Signals may reach ranks at different steps: under DDP, one signalled rank stops them
        all at the same step (rank 0 saves), so no rank waits for the others forever."""
        return distributed.any_rank(self.interrupt_reason is not None)

    def _agree_on_stop(self) -> None:
        """Early stopping decides on rank 0; every rank follows, so no rank trains on alone."""
        if self.distributed:
            decision = distributed.broadcast_object((self.state.stop_requested, self.state.stop_reason))
            self.state.stop_requested, self.state.stop_reason = decision

    def _stop_if_interrupted(self, checkpoint: Path | None) -> None:
        if self._interrupt_agreed():
            self._raise_interrupted(checkpoint)

    def _raise_interrupted(self, checkpoint: Path | None) -> None:
        where = f"saved {checkpoint}" if checkpoint else "no new checkpoint could be saved"
        reason = self.interrupt_reason or "another rank received a stop signal"
        raise TrainingInterrupted(
            f"{reason}: stopped at optimizer step {self.state.global_step}, {where}",
            checkpoint=str(checkpoint) if checkpoint else None,
        )

    # ---------------------------------------------------------------- hooks
    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self.state, *args)


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


def weight_average(model: nn.Module, config: TrainConfig) -> WeightAverage | None:
    if config.ema is not None:
        return WeightAverage(model, kind="ema", ema_decay=config.ema)
    if config.swa_start is not None:
        return WeightAverage(model, kind="swa")
    return None


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


def steps_without_length(data: Any, config: TrainConfig) -> int | None:
    """Batches per epoch for data without a length: the run's --max-steps (times accumulation)."""
    try:
        len(data)
        return None
    except TypeError:
        return config.max_steps * config.accumulate if config.max_steps else None


def has_samples(data: Any) -> bool:
    """False for evaluation data known to be empty (--val-size 0)."""
    if isinstance(data, DeviceBatches):
        return data.num_samples > 0
    try:
        return len(data) > 0
    except TypeError:
        return True
