"""The training loop, in one place, in plain PyTorch.

``Trainer.fit`` does what every practitioner should do and many forget:
``model.train()`` while fitting and ``model.eval()`` + ``torch.inference_mode()`` for
evaluation; ``zero_grad(set_to_none=True)``; AdamW with decay only on weights; the
loss of each accumulation group scaled by the group's real size; autocast with the
gradients unscaled before clipping; the pre-clip gradient norm logged; a stop with a
clear message when the loss turns NaN; a checkpoint every epoch.

Metrics are accumulated as device tensors and read once per epoch, so the loop does not
force a host-device sync on every step.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import trainkit
from trainkit.callbacks import Callback, TrainState, is_improvement
from trainkit.checkpoint import CheckpointDir, load_checkpoint
from trainkit.config import TrainConfig
from trainkit.data import DeviceBatches
from trainkit.errors import ConfigError, NonFiniteLossError, TrainkitError
from trainkit.optim import build_optimizer
from trainkit.schedules import build_scheduler

log = logging.getLogger("trainkit")

Batch = tuple[torch.Tensor, torch.Tensor]
HISTORY_FIELDS = (
    "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
    "grad_norm", "clip_fraction", "epoch_seconds", "samples_per_second",
)  # fmt: skip
NONFINITE_CHECK_EVERY = 50  # optimizer steps between checks of the on-device NaN flag


def resolve_device(name: str) -> torch.device:
    """'auto' means CUDA when available, else CPU; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name (None: full fp32)."""
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA GPU (GradScaler); on CPU use --precision bf16")
    return torch.bfloat16 if precision == "bf16" else torch.float16


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


class EpochMeter:
    """Running sums kept on the device; read back once per epoch."""

    def __init__(self, device: torch.device) -> None:
        zero = torch.zeros((), device=device, dtype=torch.float64)
        self.loss_sum, self.correct, self.grad_norm_sum, self.clipped = (zero.clone() for _ in range(4))
        self.samples = 0
        self.steps = 0

    def add_batch(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss_sum += loss.detach() * len(targets)
        self.correct += (logits.detach().argmax(dim=1) == targets).sum()
        self.samples += len(targets)

    def add_step(self, grad_norm: torch.Tensor, clipped: torch.Tensor) -> None:
        self.grad_norm_sum += grad_norm
        self.clipped += clipped
        self.steps += 1

    def results(self) -> dict[str, float]:
        samples, steps = max(self.samples, 1), max(self.steps, 1)
        return {
            "train_loss": self.loss_sum.item() / samples,
            "train_accuracy": self.correct.item() / samples,
            "grad_norm": self.grad_norm_sum.item() / steps,
            "clip_fraction": self.clipped.item() / steps,
        }


class Trainer:
    """Fit a classifier with the practices in ``TrainConfig``; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        *,
        callbacks: Sequence[Callback] = (),
        out_dir: str | Path | None = None,
        loss_fn: nn.Module | None = None,
    ) -> None:
        self.config = config.resolved()
        self.device = resolve_device(self.config.device)
        self.amp_dtype = autocast_dtype(self.config.precision, self.device)
        self.model = model.to(self.device)
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self.callbacks = list(callbacks)
        self.optimizer = build_optimizer(
            self.config.optimizer,
            self.model,
            lr=self.config.lr,
            weight_decay=self.config.weight_decay,
            momentum=self.config.momentum,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.config.precision == "fp16")
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.state = TrainState(model=self.model)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoints = (
            CheckpointDir(self.out_dir / "checkpoints", keep_last=self.config.keep_checkpoints)
            if self.out_dir is not None
            else None
        )
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self._nonfinite_step = torch.full((), -1, device=self.device, dtype=torch.long)

    # ----------------------------------------------------------------- fitting
    def fit(
        self, train: DeviceBatches, val: DeviceBatches | None = None, *, resume_from: str | Path | None = None
    ) -> list[dict[str, float]]:
        """Train for up to ``config.epochs`` epochs (early stopping may end sooner); returns the history."""
        steps_per_epoch = math.ceil(len(train) / self.config.accumulate)
        self.scheduler = build_scheduler(
            self.config.schedule,
            self.optimizer,
            total_steps=steps_per_epoch * self.config.epochs,
            warmup_steps=round(self.config.warmup * steps_per_epoch),
        )
        if resume_from is not None:
            self.load_state_dict(load_checkpoint(resume_from, map_location=self.device))
            log.info("resumed from %s after epoch %d", resume_from, self.state.epoch)
        self._rewrite_history_file()
        self._call("on_fit_start")
        while self.state.epoch < self.config.epochs and not self.state.stop_requested:
            self.state.epoch += 1
            self._run_epoch(train, val)
        if self.state.stop_requested:
            log.info("%s", self.state.stop_reason)
        self._call("on_fit_end")
        self.model.eval()
        return self.state.history

    def _run_epoch(self, train: DeviceBatches, val: DeviceBatches | None) -> None:
        state = self.state
        self._call("on_epoch_start")
        started = time.perf_counter()
        meter = self._train_one_epoch(train)
        metrics: dict[str, float] = {"epoch": state.epoch, **meter.results()}
        if val is not None and val.num_samples > 0:
            val_metrics = self.evaluate(val)
            metrics["val_loss"], metrics["val_accuracy"] = val_metrics["loss"], val_metrics["accuracy"]
        seconds = time.perf_counter() - started
        metrics.update(
            lr=self.optimizer.param_groups[0]["lr"],
            epoch_seconds=seconds,
            samples_per_second=meter.samples / seconds,
        )
        state.metrics = metrics
        state.history.append(metrics)
        self._call("on_validation_end")
        self._call("on_epoch_end")
        self._append_history_row(metrics)
        self._log_epoch(metrics)
        self._save_checkpoint(metrics)

    def _train_one_epoch(self, train: DeviceBatches) -> EpochMeter:
        self.model.train()
        meter = EpochMeter(self.device)
        steps = math.ceil(len(train) / self.config.accumulate)
        progress = tqdm(total=steps, desc=f"epoch {self.state.epoch}", leave=False, disable=None)
        for group in group_batches(train.epoch(self.state.epoch), self.config.accumulate):
            loss = self._optimizer_step(group, meter)
            self.state.global_step += 1
            self._call("on_batch_end", loss)
            progress.update()
            if self.state.global_step % NONFINITE_CHECK_EVERY == 0:
                self._raise_if_nonfinite(steps)
        progress.close()
        self._raise_if_nonfinite(steps)
        return meter

    def _optimizer_step(self, group: list[Batch], meter: EpochMeter) -> torch.Tensor:
        """One optimizer step over an accumulation group; returns the group's mean loss."""
        group_size = sum(len(targets) for _, targets in group)
        self.optimizer.zero_grad(set_to_none=True)
        group_loss = torch.zeros((), device=self.device)
        for inputs, targets in group:
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.model(inputs)
                loss = self.loss_fn(logits, targets)
            # Mean loss of the micro-batch, weighted by its share of the group: the sum over
            # the group equals the mean loss of one big batch, even for a short last group.
            share = loss * (len(targets) / group_size)
            self.scaler.scale(share).backward()
            group_loss += share.detach().float()
            meter.add_batch(loss.float(), logits, targets)
        self._flag_nonfinite(group_loss)
        self.scaler.unscale_(self.optimizer)
        grad_norm, clipped = self._clip_gradients()
        meter.add_step(grad_norm, clipped)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return group_loss

    def _clip_gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip by value and/or norm; return the pre-clip total norm and whether anything was clipped."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        pre_clip_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        clipped = torch.zeros((), device=self.device, dtype=torch.bool)
        if self.config.clip_value is not None:
            max_abs = torch.stack([g.abs().max() for g in grads]).max()
            clipped |= max_abs > self.config.clip_value
            torch.nn.utils.clip_grad_value_(params, self.config.clip_value, foreach=True)
        if self.config.clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.clip_norm, foreach=True)
            clipped |= norm > self.config.clip_norm
        return pre_clip_norm.double(), clipped.double()

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _flag_nonfinite(self, loss: torch.Tensor) -> None:
        first_time = (self._nonfinite_step < 0) & ~torch.isfinite(loss)
        self._nonfinite_step = torch.where(first_time, self.state.global_step + 1, self._nonfinite_step)

    def _raise_if_nonfinite(self, steps_per_epoch: int) -> None:
        step = int(self._nonfinite_step.item())
        if step < 0:
            return
        last = f"epoch {self.state.epoch - 1}" if self.state.epoch > 1 else "none yet"
        raise NonFiniteLossError(
            f"the training loss became NaN/inf at optimizer step {step} (epoch {self.state.epoch}, "
            f"step {step - (self.state.epoch - 1) * steps_per_epoch} of the epoch); training stopped. "
            f"Last checkpoint: {last}. Try a lower --lr, --clip-norm, or --precision fp32."
        )

    # -------------------------------------------------------------- evaluation
    @torch.inference_mode()
    def evaluate(self, batches: Iterable[Batch] | DeviceBatches) -> dict[str, float]:
        """Mean loss and accuracy in eval mode (BatchNorm running stats, no dropout)."""
        self.model.eval()
        if isinstance(batches, DeviceBatches):
            batches = batches.epoch(0)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        samples = 0
        for inputs, targets in batches:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self._autocast():
                logits = self.model(inputs)
                loss_sum += self.loss_fn(logits, targets).double() * len(targets)
            correct += (logits.argmax(dim=1) == targets).sum()
            samples += len(targets)
        if samples == 0:
            raise TrainkitError("cannot evaluate on an empty dataset")
        return {"loss": loss_sum.item() / samples, "accuracy": correct.item() / samples}

    @torch.inference_mode()
    def predict(self, inputs: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Logits for ``inputs``. Refuses a model in training mode: its outputs would be wrong."""
        if self.model.training:
            raise TrainkitError(
                "predict() refuses a model in training mode (dropout active, BatchNorm using batch "
                "statistics); call model.eval() first"
            )
        batch_size = batch_size or self.config.eval_batch_size
        outputs = []
        for start in range(0, len(inputs), batch_size):
            with self._autocast():
                outputs.append(self.model(inputs[start : start + batch_size].to(self.device)).float())
        return torch.cat(outputs)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run (plain data: loads with weights_only=True)."""
        return {
            "format": "trainkit-checkpoint",
            "format_version": 1,
            "versions": {"trainkit": trainkit.__version__, "torch": str(torch.__version__)},
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "epoch": self.state.epoch,
            "global_step": self.state.global_step,
            "history": self.state.history,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "callbacks": {type(callback).__name__: callback.state_dict() for callback in self.callbacks},
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and payload["scheduler"] is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.state.epoch = payload["epoch"]
        self.state.global_step = payload["global_step"]
        self.state.history = list(payload["history"])
        self.state.metrics = self.state.history[-1] if self.state.history else {}
        self.best_metric, self.best_epoch = payload["best_metric"], payload["best_epoch"]
        for callback in self.callbacks:
            saved = payload["callbacks"].get(type(callback).__name__)
            if saved:
                callback.load_state_dict(saved)
        torch.set_rng_state(payload["rng"]["torch"])
        random.setstate(payload["rng"]["python"])

    def _is_new_best(self, metrics: dict[str, float]) -> bool:
        """Best by the same rule as early stopping (monitor, mode, min_delta), so both agree."""
        value = metrics.get(self.config.monitor)
        if value is None or not is_improvement(value, self.best_metric, self.config.monitor_mode, self.config.min_delta):
            return False
        self.best_metric, self.best_epoch = value, self.state.epoch
        return True

    def _save_checkpoint(self, metrics: dict[str, float]) -> None:
        is_best = self._is_new_best(metrics)
        if self.checkpoints is not None:
            self.checkpoints.save(self.state_dict(), self.state.epoch, is_best=is_best)

    # ---------------------------------------------------------------- logging
    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self.state, *args)

    @property
    def history_path(self) -> Path | None:
        return self.out_dir / "history.csv" if self.out_dir is not None else None

    def _rewrite_history_file(self) -> None:
        """Start history.csv afresh (on resume: with the checkpoint's rows only)."""
        if self.history_path is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.history_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.state.history)

    def _append_history_row(self, metrics: dict[str, float]) -> None:
        if self.history_path is None:
            return
        with self.history_path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=HISTORY_FIELDS, extrasaction="ignore").writerow(metrics)

    def _log_epoch(self, m: dict[str, float]) -> None:
        val = f" val_loss {m['val_loss']:.4f} val_acc {m['val_accuracy']:.4f}" if "val_loss" in m else ""
        log.info(
            "epoch %d/%d  train_loss %.4f train_acc %.4f%s  lr %.2e  grad_norm %.3f clipped %.0f%%  %.1fs (%.0f samples/s)",
            m["epoch"], self.config.epochs, m["train_loss"], m["train_accuracy"], val, m["lr"],
            m["grad_norm"], 100 * m["clip_fraction"], m["epoch_seconds"], m["samples_per_second"],
        )  # fmt: skip
