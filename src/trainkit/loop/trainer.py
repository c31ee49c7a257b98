"""The training loop, in one place, in plain PyTorch.

``Trainer.fit`` does what every practitioner should do and many forget: ``model.train()`` while
fitting and ``model.eval()`` + ``torch.inference_mode()`` for evaluation;
``zero_grad(set_to_none=True)``; AdamW with decay only on weights; the loss of each accumulation
group scaled by the group's real size; autocast with the gradients unscaled before clipping; the
pre-clip gradient norm logged; a policy for NaN losses; checkpoints that resume exactly.

The loop, top-down (``on_*``: a callback hook; ``[A]``: an agreement point, where under DDP/FSDP
every rank calls the strategy in the same order; docs/architecture.md numbers them)::

    fit(train, val, resume_from):
        settle epochs and steps; start the lr schedule; check --monitor
        resume_from: payload.restore(...)                            [A] a .dcp: collective
        nonfinite.on_fit_start(); on_fit_start
        while epochs and steps remain and no stop was requested:
            run_epoch  (NonFiniteStep: nonfinite.recover, the rollback policy)
        averaging.finish (the EMA or SWA average becomes the weights); on_fit_end; model.eval()

    run_epoch:
        epoch += 1; lr.on_epoch_start (SWALR); on_epoch_start; model.train()
        for each accumulation group of this epoch's batches (a resumed epoch skips those done):
            loss = optimizer_step(group); global_step += 1; on_batch_end(loss)
            interrupted, stop now?                                   [A] any rank
            --val-every-steps due: measure_row; stop decision; maybe a new best   [A]
            mid-epoch checkpoint when due, validated or interrupted [A] payload.save
            every 50 steps: labels in range, NaN in the logged losses            [A]
        labels and logged losses checked                              [A]
        averaging.on_epoch_end (SWA)
        measure_row: training sums [A], validate [A], rank 0's row [A], on_validation_end
        on_epoch_end; rank 0's stop decision [A]; lr.on_metrics (plateau); the row to history.csv
        weights finite? else nonfinite.bad_weights                    [A] every rank
        save the epoch's checkpoint (and best.pt)                     [A]
        interrupted? TrainingInterrupted after the save               [A]

    optimizer_step(group):
        strategy.before_step (FSDP: rank 0's buffers)                 [A]
        buffers.take(); until it fits: accumulate(group), else backoff.halve   [A] DDP/FSDP agree
        scaler.unscale_; strategy.clip_gradients -> pre-clip norm     [A] FSDP: the full norm
        nonfinite.step_is_bad(loss, norm)? nonfinite.skip_step        [A] skip/rollback: every rank
        count the group's metrics; on_before_optimizer_step(norm)
        backoff.step_optimizer (scaler.step); scaler.update; averaging.after_optimizer_step; lr.step

    accumulate(group):
        zero_grad; micro-batches (cut to the back-off's size); strategy.group_size   [A]
        for each micro-batch, with strategy.gradient_sync(last):      [A] DDP: the last backward
            forward under autocast; backward(scaler.scale(loss * count / group size))

Data parallel (``--strategy ddp|fsdp``, docs/scaling.md): each rank trains on its slice of every
global batch; the strategy (trainkit.distributed.strategies) wraps the model and runs every agreement point;
only rank 0 writes files.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from trainkit.data.epochs import EpochBatches
from trainkit.loop.callbacks import Callback, TrainState, check_callbacks, is_improvement
from trainkit.checkpoint.store import CheckpointDir, load_checkpoint
from trainkit.config.names import DEFAULT_SKIP_FRACTION
from trainkit.config.schema import TrainConfig
from trainkit.devices import explaining_nondeterministic_ops, run_device
from trainkit.errors import ConfigError, DataError, TrainingInterrupted, TrainkitError
from trainkit.faults import crash_point
from trainkit.tracking.history import EpochMeter, HistoryFile, format_epoch
from trainkit.loop import payload
from trainkit.loop.averaging import WeightAveraging
from trainkit.loop.evaluation import Evaluator, raise_if_labels_outside
from trainkit.loop.lr import LrControl
from trainkit.loop.nonfinite import NONFINITE_CHECK_EVERY, POLICIES, NonFiniteStep, nonfinite_loss_error
from trainkit.loop.oom import MicroBatchBackoff
from trainkit.loop.setup import (
    check_data_splits, check_monitors, scaled_lr, trainer_task, training_batches, warn_about_recipe_settings, warn_if_validation_nonfinite,
)  # fmt: skip
from trainkit.loop.steps import (
    BufferSnapshot, data_error_text, group_batches, has_samples, labelled_as_data, phase, split_micro_batches,
)  # fmt: skip
from trainkit.optim.lr_finder import LRFinderResult, lr_find
from trainkit.optim.optimizers import build_optimizer, check_user_optimizer
from trainkit.precision import autocast_dtype, masked_by_overflow, overflow
from trainkit.checkpoint.rundir import holding_run_folder, remove_stale_temp_files
from trainkit.data.runtime import batch_rows, to_device
from trainkit.distributed.strategies import Strategy, make_strategy
from trainkit.tasks.base import StepOutput, Task, detached
from trainkit.tasks.labels import no_target_text  # fmt: skip

log = logging.getLogger("trainkit")

Batch = Any  # a tensor, tuple, list, dict or dataclass of tensors (trainkit.data.runtime)


class Trainer:
    """Fit any model on any data with the practices in ``TrainConfig``; see the module docstring.

    ``task``: what a batch means and what is measured (a ``trainkit.tasks.base.Task`` or one of
    ``TASKS``' names; default classification). ``loss_fn``, ``metrics`` and ``step`` build the task
    when it is given by name. ``optimizer``/``scheduler``: the user's own objects instead of the
    configured ones (trainkit's optimizer keeps weight decay off biases and norm weights);
    a scheduler is stepped once per optimizer step. ``scaler``: your own ``torch.amp.GradScaler``
    (another ``init_scale`` or growth interval) instead of fp16's default one. ``strategy``: how
    a step runs across processes (trainkit.distributed.strategies; experimental).
    """

    _reducing = False  # inside a backward that all-reduces DDP's gradients

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
            raise ConfigError("Trainer needs a numeric lr; run trainkit.optim.lr_finder.lr_find first (train_run does)")
        self.device = run_device(self.config.device, deterministic=self.config.deterministic, tf32=self.config.tf32)
        self.amp_dtype = autocast_dtype(self.config.precision, self.device)
        self.memory_format = torch.channels_last if self.config.channels_last else torch.contiguous_format
        # how a step runs across processes: one process, DDP or FSDP (trainkit.distributed.strategies)
        self.strategy = strategy if strategy is not None else make_strategy(self.config)
        if not isinstance(self.strategy, Strategy):
            raise ConfigError("Trainer's strategy must be a trainkit.distributed.strategies.Strategy, "
                              f"got {type(self.strategy).__name__}")  # fmt: skip
        self.rank, self.world_size = self.strategy.rank, self.strategy.world_size
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
            self.config.optimizer, self.model, lr=self.lr, weight_decay=self.config.weight_decay,
            momentum=self.config.momentum, fused=self.config.fused_optimizer,
        )  # fmt: skip
        check_user_optimizer(self.optimizer, scheduler, self.model)
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(
            self.device.type, enabled=self.config.precision == "fp16")  # fmt: skip
        if not isinstance(self.scaler, torch.amp.GradScaler):
            raise ConfigError(f"Trainer's scaler must be a torch.amp.GradScaler, got {type(self.scaler).__name__}")
        self.schedule = LrControl(self.optimizer, self.config, scheduler)  # schedule, SWALR, rollbacks' scale
        self.averaging = WeightAveraging(self.model, self.config)  # --ema / --swa-start
        self.buffers = BufferSnapshot(self.model)  # undoes a skipped or retried step's BatchNorm updates
        self.backoff = MicroBatchBackoff(self.strategy, self.optimizer, self.buffers, self.device, self.config.accumulate)
        self.nonfinite = POLICIES[self.config.on_nonfinite](self)  # --on-nonfinite raise | skip | rollback
        self.evaluator = Evaluator(self.task, self.strategy, self.backoff, self.config, self.device,
                                   self.memory_format, self._autocast)  # fmt: skip
        self.train_batches: EpochBatches | None = None
        self.epochs, self.max_steps = self.config.epochs, self.config.max_steps  # fit() settles epochs from the data
        self.max_skipped_steps = self.config.max_skipped_steps  # None until fit() knows the epoch length
        self.state = TrainState(model=self.model, eval_model=self.averaging.eval_module(self.model))
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoints = None if self.out_dir is None else CheckpointDir(
            self.out_dir / "checkpoints", keep_last=self.config.keep_checkpoints,
            keep_every=self.config.keep_every_epochs,
        )  # fmt: skip
        self.history_file = HistoryFile(self.out_dir / "history.csv" if self.out_dir is not None and self.is_main else None)
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.rollbacks = 0
        self.failed_saves = 0  # checkpoint writes that failed (disk full, permissions): reported in the summary
        self.interrupt_reason: str | None = None
        self.meter = self._new_meter()  # the running sums of the row in progress
        self.batches_done = 0  # micro-batches of the current epoch already trained on
        self.validated_this_epoch = False
        self.pending_position: dict[str, Any] | None = None  # set when resuming mid-epoch
        self._labels_checked_at = 0  # the optimizer step up to which the label guard's record was read

    # what these parts hold, under the names the Trainer has always had
    micro_batch_size = property(lambda self: self.backoff.micro_batch_size)
    eval_micro_batch_size = property(lambda self: self.backoff.eval_micro_batch_size)
    scheduler = property(lambda self: self.schedule.scheduler)
    lr_scale = property(lambda self: self.schedule.scale)
    average = property(lambda self: self.averaging.average)
    swa_applied = property(lambda self: self.averaging.swa_applied)

    # ----------------------------------------------------------------- fitting
    def fit(self, train: Any, val: Any = None, *,
            resume_from: str | Path | dict[str, Any] | None = None) -> list[dict[str, float]]:  # fmt: skip
        """Train for ``config.epochs`` epochs or ``config.max_steps`` optimizer steps (early stopping
        may end sooner); returns the history, one row per epoch (and per ``val_every_steps`` point).

        ``train``/``val``: any data ``trainkit.data.epochs.as_epoch_batches`` accepts (a Dataset, a
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
        check_data_splits(self.task, self.model, {"training": train, "validation": val}, self._data_prefix())
        train = self.train_batches = training_batches(train, self.config, self.device, self.rank, self.world_size)
        self._settle_length(len(train))
        check_monitors(self.task, self.config.monitor, self.callbacks, has_validation=val is not None)
        self.state.eval_model = self.averaging.eval_module(self.model)
        if resume_from is not None:
            loaded = resume_from if isinstance(resume_from, dict) else load_checkpoint(resume_from, weights=False)
            self.load_state_dict(loaded)  # [A0] a sharded checkpoint: collective
            log.info("resumed at epoch %d, optimizer step %d", self.state.epoch + 1, self.state.global_step)
        if self.checkpoints is not None and self.is_main:
            remove_stale_temp_files(self.out_dir)
            self.checkpoints.remove_temp_files()
        self.nonfinite.on_fit_start()  # rollback: a host copy of the state to fall back on
        self.history_file.rewrite(self.state.history)
        self._call("on_fit_start")
        while self.state.epoch < self.epochs and not self.state.stop_requested and not self._out_of_steps():
            try:
                self._run_epoch(train, val)
            except NonFiniteStep as bad:
                self.nonfinite.recover(bad.step)
        if self.state.stop_requested:
            log.info("%s", self.state.stop_reason)
        self.averaging.finish(self.model, self._one_more_pass, self._forward_inputs, self._autocast())
        self.state.eval_model = self.model
        self._call("on_fit_end")
        self.model.eval()
        return self.state.history

    def _one_more_pass(self) -> Iterator[Batch]:
        """The training data once more, on the device (SWA's BatchNorm statistics)."""
        return (to_device(b, self.device, self.memory_format) for b in self.train_batches.epoch(self.state.epoch + 1))

    def _forward_inputs(self, module: nn.Module, batch: Batch) -> Any:
        return self.task.forward(module, self.task.split(batch)[0])

    def _settle_length(self, batches_per_epoch: int) -> None:
        """Epochs, steps, the schedule and the skip limit, once the data's length is known."""
        steps_per_epoch = self.steps_per_epoch = math.ceil(batches_per_epoch / self.config.accumulate)
        if steps_per_epoch == 0:
            raise ConfigError("the training data yields no batch (is it empty, or smaller than one batch with drop_last?)")
        # max_steps, when given, is the budget (as in Keras' steps and Hugging Face's max_steps)
        self.epochs = self.config.epochs if self.max_steps is None else math.ceil(self.max_steps / steps_per_epoch)
        if self.config.swa_start is not None and self.config.swa_start > self.epochs:
            raise ConfigError(f"--swa-start {self.config.swa_start} is after the run's last epoch ({self.epochs}); "
                              f"use an epoch in 1..{self.epochs}")  # fmt: skip
        self.schedule.start(steps_per_epoch, steps_per_epoch * self.epochs if self.max_steps is None else self.max_steps)
        if self.max_skipped_steps is None:
            self.max_skipped_steps = max(1, math.ceil(DEFAULT_SKIP_FRACTION * steps_per_epoch))

    def _run_epoch(self, train: EpochBatches, val: Any) -> None:
        state = self.state
        state.epoch += 1
        self.schedule.on_epoch_start(state.epoch)  # SWALR from --swa-start
        self._call("on_epoch_start")
        self._row_started = time.perf_counter()
        self._train_one_epoch(train, val)
        self.averaging.on_epoch_end(state.epoch, self.model)  # SWA averages the ends of epochs
        measured = bool(self.meter.steps or self.meter.skipped or not self.validated_this_epoch)
        if measured:  # not when the epoch stopped right after a --val-every-steps row
            self._measure_row(val)
        self._call("on_epoch_end")
        self._agree_on_stop()
        self.schedule.on_metrics(state.metrics)  # reduce-on-plateau
        if measured:
            self._publish_row(state.metrics)  # after on_epoch_end: what a callback adds is kept
        if not self.strategy.weights_finite(self.model):  # [A] after the callbacks: nothing non-finite is saved or best
            self.nonfinite.bad_weights()
        saved = payload.save(self, epoch_complete=True, is_best=measured and self._is_new_best(state.metrics))
        if self.strategy.any_rank(self.interrupt_reason is not None)[0]:  # [A] one signalled rank stops them all
            self._raise_interrupted(saved)

    def _train_one_epoch(self, train: EpochBatches, val: Any) -> None:
        self.model.train()
        self._resume_position()
        steps = math.ceil(len(train) / self.config.accumulate)
        progress = tqdm(total=steps, initial=self.batches_done // self.config.accumulate,
                        desc=f"epoch {self.state.epoch}", leave=False, disable=None if self.is_main else True)  # fmt: skip
        every, val_every = self.config.checkpoint_every_steps, self.config.val_every_steps
        global_samples = getattr(train, "global_samples", None)  # what the data knows without asking the ranks
        batches = labelled_as_data(train.epoch(self.state.epoch, self.batches_done), self._training_batch)
        self._labels_checked_at = self.state.global_step
        for group in group_batches(batches, self.config.accumulate):
            known = global_samples(self.batches_done, len(group)) if global_samples is not None else None
            try:
                loss = self._optimizer_step(group, known)
            except DataError as exc:
                raise DataError(f"{self._training_batch()}: {exc}") from None
            self.batches_done += len(group)
            self.state.global_step += 1
            self._call("on_batch_end", loss)
            progress.update()
            crash_point("step")
            # [A] a signal or a callback's "stop now" may reach ranks at different steps: one stops them all
            interrupted, stop_now = self.strategy.any_rank(self.interrupt_reason is not None, self.state.stop_now)
            ending = stop_now or self._out_of_steps()
            mid_epoch = self.batches_done < len(train) and not ending
            validate = mid_epoch and val_every and self.state.global_step % val_every == 0
            is_best = validate and self._validate_mid_epoch(val)
            if mid_epoch and (interrupted or validate or (every and self.state.global_step % every == 0)):
                saved = payload.save(self, epoch_complete=False, is_best=is_best)  # [A]
                if interrupted:
                    self._raise_interrupted(saved)
            if self.state.global_step % NONFINITE_CHECK_EVERY == 0:
                self._check_recent_steps(steps)  # [A]
            if ending or (validate and self.state.stop_requested):
                break
        progress.close()
        self._check_recent_steps(steps)  # [A]

    def _resume_position(self) -> None:
        """A new row's sums, or the ones a mid-epoch checkpoint saved (None: a rank a world-size change added)."""
        self.meter, self.batches_done, self.validated_this_epoch = self._new_meter(), 0, False
        position, self.pending_position = self.pending_position, None
        if position is not None:
            if position["meter"] is not None:
                self.meter.load_state_dict(position["meter"])
            self.batches_done, self.validated_this_epoch = position["batches_done"], position.get("validated", False)

    def _optimizer_step(self, group: list[Batch], global_samples: int | None = None) -> torch.Tensor:
        """One optimizer step over an accumulation group; returns the group's mean loss.

        ``global_samples``: the group's rows over all ranks when the data knows it without asking
        (DeviceBatches, DatasetBatches): see ``Strategy.group_size``.
        """
        self.strategy.before_step(self.model)  # [A] FSDP: rank 0's buffers everywhere
        self.buffers.take()
        while True:
            try:
                on_device = [to_device(batch, self.device, self.memory_format) for batch in group]
                group_loss, group_size, weight, observed = self._accumulate_gradients(on_device, global_samples)
                break
            except torch.OutOfMemoryError:
                pass  # the traceback holds the partial graph: free it after leaving this block
            on_device = None  # the failed try's device copy, freed before the retry
            # [A] DDP/FSDP: every rank backs off together, or the run stops in one line
            self.backoff.halve(group, self.state.global_step + 1, mid_reduction=self._reducing)
            self._reducing = False
        with phase("optimizer"):
            self.scaler.unscale_(self.optimizer)
            overflowed = overflow(self.scaler, self.optimizer, self.device)  # fp16: this step will be skipped
            clip = self.strategy.clip_gradients(self.model, self.config.clip_value, self.config.clip_norm, self.device)
            grad_norm, clipped = masked_by_overflow(*clip, overflowed)  # [A] FSDP: the norm of all shards
            if self.nonfinite.step_is_bad(group_loss, grad_norm):  # [A] skip/rollback: every rank decides alike
                self.nonfinite.skip_step()
                return group_loss
            for output in observed:  # only now is the group known to count (no OOM retry, not skipped)
                self._observe(output)
            rows = sum(batch_rows(batch) for batch in group)
            self.meter.add_step(group_loss, group_size, weight, rows, grad_norm, clipped, overflowed)
            self.state.lr = self.schedule.current
            self._call("on_before_optimizer_step", grad_norm)
            self.backoff.step_optimizer(self.scaler, self.state.global_step + 1)
            self.scaler.update()
            self.averaging.after_optimizer_step(self.model)  # EMA
            self.schedule.step()
        return group_loss

    def _accumulate_gradients(
        self, group: list[Batch], global_samples: int | None
    ) -> tuple[torch.Tensor, Any, Any, list[StepOutput]]:
        """Forward and backward over the group's micro-batches.

        Returns (group mean loss, group size the shares were taken of, this rank's sample count,
        the step outputs whose metrics are still to be counted: an out-of-memory retry or a
        skipped step must not count them twice, or at all).
        """
        self.optimizer.zero_grad(set_to_none=True)
        micro_batches = split_micro_batches(group, self.backoff.micro_batch_size)
        counts = [self.task.samples(batch) for batch in micro_batches]
        weight = sum(counts)
        # [A] DDP, FSDP: the group's samples over all ranks, unless the data knows them
        group_size = self.strategy.group_size(weight, counts, micro_batches, global_samples, self.device)
        group_loss: torch.Tensor | None = None
        deferred: list[StepOutput] = []
        for index, (batch, count) in enumerate(zip(micro_batches, counts)):
            last = index == len(micro_batches) - 1
            with self.strategy.gradient_sync(last):  # [A] gradients are reduced in the last backward only
                with phase("forward"), self._autocast():
                    output = self.task.step(self.forward, batch)
                # Mean loss of the micro-batch, weighted by its share of the group: the sum over
                # the group equals the mean loss of one big batch, even for a short last group.
                share = output.loss * (count / group_size)
                # an OOM in a backward that all-reduces (DDP's last) leaves the ranks mid-reduction
                self._reducing = self.strategy.reduces_in_backward(last)
                with phase("backward"):
                    self.scaler.scale(share).backward()
                self._reducing = False
            group_loss = share.detach() if group_loss is None else group_loss + share.detach()
            deferred.append(detached(output))
        return group_loss, group_size, weight, deferred

    def _observe(self, output: StepOutput) -> None:
        """Count a micro-batch in the epoch's metrics; callbacks see the latest at on_batch_end."""
        if output.outputs is not None and output.targets is not None:
            self.meter.metrics.update(output.outputs, output.targets)
        self.state.step_output = output

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------- rows and decisions
    def _measure_row(self, val: Any) -> dict[str, float]:
        """The metrics since the previous row (training) and now (validation); callbacks see them
        at on_validation_end. Starts the next row's sums from zero."""
        state = self.state
        train_metrics = self.meter.results()  # [A] the ranks' sums
        train_metrics.update(self._derived("train_", train_metrics))
        metrics: dict[str, Any] = {"epoch": state.epoch}
        if self.config.val_every_steps:
            metrics["step"] = state.global_step
        metrics.update((k, v) for k, v in train_metrics.items() if k.startswith("train_"))
        if val is not None and has_samples(val):
            metrics.update((f"val_{k}", v) for k, v in self._validate(val).items())
        seconds = time.perf_counter() - self._row_started
        metrics["lr"] = self.schedule.current
        metrics.update((k, v) for k, v in train_metrics.items() if not k.startswith("train_"))
        metrics.update(epoch_seconds=seconds, samples_per_second=self.meter.total_rows / seconds)
        metrics = self.strategy.broadcast(metrics)  # [A] rank 0's numbers everywhere: same decisions
        if self.is_main:
            warn_if_validation_nonfinite(metrics, self._position(), self.callbacks, self.schedule.watches_plateau())
        state.metrics = metrics
        state.history.append(metrics)
        self._call("on_validation_end")
        self.meter = self._new_meter()
        self._row_started = time.perf_counter()
        return metrics

    def _validate_mid_epoch(self, val: Any) -> bool:
        """A --val-every-steps point: a history row, early stopping's look, maybe a new best."""
        metrics = self._measure_row(val)
        self.validated_this_epoch = True
        self._agree_on_stop()
        self._publish_row(metrics)
        self.model.train()
        return self.strategy.weights_finite(self.model) and self._is_new_best(metrics)  # [A]

    def _agree_on_stop(self) -> None:
        """[A] Early stopping decides on rank 0; every rank follows, so no rank trains on alone."""
        self.state.stop_requested, self.state.stop_reason = self.strategy.broadcast(
            (self.state.stop_requested, self.state.stop_reason))  # fmt: skip

    def _is_new_best(self, metrics: dict[str, float]) -> bool:
        """Best by the same rule as early stopping (monitor, mode, min_delta), so both agree."""
        value = metrics.get(self.config.monitor)
        if value is None or not is_improvement(value, self.best_metric, self.config.monitor_mode, self.config.min_delta):
            return False
        self.best_metric, self.best_epoch = value, self.state.epoch
        return True

    def _publish_row(self, metrics: dict[str, float]) -> None:
        self.history_file.append(metrics, self.state.history)
        log.info("%s", format_epoch(metrics, self.epochs))

    def _new_meter(self) -> EpochMeter:
        return EpochMeter(self.device, self.task.new_metrics(), scaled=self.scaler.is_enabled())

    def _derived(self, prefix: str, metrics: dict[str, float]) -> dict[str, float]:
        plain = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
        return {prefix + k: v for k, v in self.task.derived(plain).items()}

    def _out_of_steps(self) -> bool:
        return self.max_steps is not None and self.state.global_step >= self.max_steps

    # ------------------------------------------------------------------ checks
    def _check_recent_steps(self, steps_per_epoch: int) -> None:
        """Every NONFINITE_CHECK_EVERY optimizer steps and at each epoch's end: labels the loss could
        not take (LabelGuard), then NaN/inf losses, explained by a batch with no target when there was one."""
        batches = (f"a training batch of epoch {self.state.epoch} "
                   f"(optimizer steps {self._labels_checked_at + 1}-{self.state.global_step})")  # fmt: skip
        seen = raise_if_labels_outside(self.task, self.strategy, f"{self._data_prefix()}{batches}", training=True)
        self._labels_checked_at = self.state.global_step
        step = self.nonfinite.first_logged_bad_step()  # [A] the earliest over ranks
        if step < 0:
            return
        if seen is not None and seen.no_target:  # that, not the lr, is why the loss is NaN
            raise DataError(f"{self._data_prefix()}the training loss became NaN at optimizer step {step}: "
                            f"{no_target_text(batches, self.task.label_guard.ignore_index)}")  # fmt: skip
        raise nonfinite_loss_error(step, self.state.epoch, steps_per_epoch)

    def _data_prefix(self) -> str:
        """'--dataset NAME: ' when the run's recipe named its data (train_run), else nothing."""
        name = self.run_info.get("data_fingerprint", {}).get("dataset")
        return f"--dataset {name}: " if name else ""

    def _training_batch(self) -> str:
        """Where a DataError in the step in progress happened."""
        step, epoch = self.state.global_step + 1, self.state.epoch
        return f"{self._data_prefix()}the training batch of optimizer step {step} (epoch {epoch})"

    def _position(self) -> str:
        """'epoch 2' (with --val-every-steps: 'epoch 2, optimizer step 40')."""
        step = f", optimizer step {self.state.global_step}" if self.config.val_every_steps else ""
        return f"epoch {self.state.epoch}{step}"

    # -------------------------------------------------------------- evaluation
    def evaluate(self, data: Any, model: nn.Module | None = None) -> dict[str, float]:
        """The task's loss and metrics in eval mode (BatchNorm running stats, no dropout).

        ``data``: anything ``fit`` accepts. ``model``: what to evaluate (default: what validation
        measures, the EMA under --ema; after fit, the final weights). Under DDP each rank evaluates
        its shard with rank 0's BatchNorm statistics and the sums are all-reduced, so every rank
        returns the same numbers.
        """
        module = self.state.eval_model if model is None else model
        return self.evaluator.evaluate(module, self.eval_forward if module is self.model else module, data)

    def _validate(self, val: Any) -> dict[str, float]:
        """evaluate() on the validation data; its DataErrors say which validation."""
        try:
            return self.evaluate(val)
        except DataError as exc:
            where = f"{self._data_prefix()}validation after {self._position()}"
            raise DataError(f"{where}: {data_error_text(exc)}") from None

    def predict(self, data: Any, batch_size: int | None = None) -> Any:
        """The model's outputs for ``data`` (a tensor of inputs, or anything ``fit`` accepts; targets
        in it are ignored), concatenated along the first dimension in host memory. Refuses a model
        in training mode: its outputs would be wrong."""
        if self.model.training:
            raise TrainkitError(
                "predict() refuses a model in training mode (dropout active, BatchNorm using batch "
                "statistics); call model.eval() first"
            )
        return self.evaluator.predict(self.eval_forward, data, batch_size or self.config.eval_batch_size)

    # ------------------------------------------------------------ the public rest
    def lr_find(self, train: Any, **options: Any) -> LRFinderResult:
        """LR range test on this trainer's model, optimizer, task, accumulation and precision.

        Leaves no trace (see trainkit.optim.lr_finder); build a new Trainer with the suggested lr.
        """
        return lr_find(self.model, self.optimizer, training_batches(train, self.config, self.device, self.rank, self.world_size), self.task,
                       accumulate=self.config.accumulate, precision=self.config.precision, **options)  # fmt: skip

    def request_interrupt(self, reason: str) -> None:
        """Ask for a clean stop: finish the current step, save a checkpoint, raise TrainingInterrupted.

        Safe to call from a signal handler: it only sets a flag that the loop reads.
        """
        self.interrupt_reason = reason

    def state_dict(self, *, epoch_complete: bool = True) -> dict[str, Any]:
        """Everything needed to continue this run (trainkit.loop.payload; loads with weights_only=True)."""
        return payload.capture(self, epoch_complete=epoch_complete)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore a checkpoint's state; parts that do not fit this run are one CheckpointError."""
        payload.restore(self, saved)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's whole state_dict (for exports); under FSDP a collective that gathers it on
        rank 0's CPU, the other ranks getting an empty dict."""
        return self.strategy.full_state_dict(self.model)

    def describe_final_weights(self, restored_epoch: int | None) -> str:
        """What the final weights are, for the summary."""
        return self.averaging.describe(self.state.epoch, restored_epoch)

    def _raise_interrupted(self, checkpoint: Path | None) -> None:
        where = f"saved {checkpoint}" if checkpoint else "no new checkpoint could be saved"
        reason = self.interrupt_reason or "another rank received a stop signal"
        raise TrainingInterrupted(
            f"{reason}: stopped at optimizer step {self.state.global_step}, {where}",
            checkpoint=str(checkpoint) if checkpoint else None,
        )

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self.state, *args)
