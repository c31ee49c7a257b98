"""A checkpoint's payload: what goes in (``capture``), how it comes back (``restore``), and how it
is written (``save``). The format is trainkit-checkpoint version 2 (trainkit.checkpoint.file's
PAYLOAD_SCHEMA): plain data that loads with ``weights_only=True``.

Exact resume: the payload holds every piece of state the rest of the run depends on (weights,
optimizer, schedule, scaler, weight average, RNG, the position inside the epoch and the epoch's
running metrics), and each epoch's data order is a function of (seed, epoch) alone, so replaying
from it performs the same operations in the same order as the uninterrupted run. Under DDP every
rank's RNG and running sums travel in ``per_rank`` (a gather: every rank captures).

These functions read and set the Trainer's run state (model, optimizer, schedule, averaging,
scaler, state, counters, callbacks, data position) and nothing else.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import trainkit
from trainkit import distributed
from trainkit.data.loader import LoaderBatches
from trainkit.loop.callbacks import callback_keys
from trainkit.checkpoint.file import state_dict_mismatch
from trainkit.devices import restore_rng, rng_state, to_host
from trainkit.errors import CheckpointError
from trainkit.tracking.history import merged_meter_state

if TYPE_CHECKING:
    from trainkit.loop.trainer import Trainer

log = logging.getLogger("trainkit")

FORMAT_VERSION = 2


def capture(trainer: Trainer, *, epoch_complete: bool = True) -> dict[str, Any]:
    """Everything needed to continue the run. ``epoch`` is the epoch in progress (or just
    completed); ``position`` says how far into it training got, with the epoch's running metrics."""
    state = trainer.state
    position = None if epoch_complete else {
        "batches_done": trainer.batches_done, "meter": trainer.meter.state_dict(),
        "validated": trainer.validated_this_epoch,
    }  # fmt: skip
    rng = rng_state(trainer.device)
    schedule = trainer.schedule.state_dict()
    payload = {
        "format": "trainkit-checkpoint",
        "format_version": FORMAT_VERSION,
        "versions": {"trainkit": trainkit.__version__, "torch": str(torch.__version__)},
        "config": trainer.config.loop_settings(),  # the recipe's settings, if any, are in run_info
        "run_info": trainer.run_info,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": schedule["scheduler"],
        "swa_scheduler": schedule["swa_scheduler"],
        "average": trainer.averaging.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "epoch": state.epoch,
        "position": position,
        "global_step": state.global_step,
        "history": state.history,
        "best_metric": trainer.best_metric,
        "best_epoch": trainer.best_epoch,
        "rollbacks": trainer.rollbacks,
        "lr_scale": schedule["lr_scale"],
        "failed_saves": trainer.failed_saves,
        "stop": {"requested": state.stop_requested, "reason": state.stop_reason},
        "callbacks": {key: callback.state_dict() for key, callback in zip(callback_keys(trainer.callbacks), trainer.callbacks)},
        "data": trainer.train_batches.state_dict() if hasattr(trainer.train_batches, "state_dict") else None,
        "rng": rng,
    }
    # agreement point (DDP, FSDP): each rank's dropout stream and running sums, for an exact resume
    per_rank = trainer.strategy.per_rank({"rng": rng, "meter": to_host(trainer.meter.state_dict())})
    if per_rank is not None:
        payload["per_rank"] = per_rank
    return payload


def restore(trainer: Trainer, payload: dict[str, Any]) -> None:
    """Restore a checkpoint's state; parts that do not fit this run are one CheckpointError."""
    own = rank_state(trainer, payload)
    mismatch = state_dict_mismatch(trainer.model, payload["model"])
    if mismatch is not None:
        raise CheckpointError(f"the checkpoint's weights do not fit this model ({mismatch}): it was written "
                              f"for another --model or --hidden")  # fmt: skip
    try:
        _restore(trainer, payload, own)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"the checkpoint's state does not fit this run ({problem})") from None


def rank_state(trainer: Trainer, payload: dict[str, Any]) -> dict[str, Any] | None:
    """This rank's RNG streams and the epoch's running sums: its own, on the world size that wrote
    them. On another one (N processes' checkpoint resumed on M): the weights, optimizer, schedule,
    counters and the data position (in global batches, each epoch's order a function of (seed,
    epoch)) carry over; rank 0 takes the ranks' summed running sums, and every rank starts new
    dropout/augmentation streams: the run continues, but not bit for bit."""
    saved_world = payload.get("run_info", {}).get("world_size", 1)
    if saved_world == trainer.world_size:
        return payload["per_rank"][trainer.rank] if "per_rank" in payload else None
    if isinstance(trainer.train_batches, LoaderBatches):
        raise CheckpointError(
            f"this checkpoint was written by {saved_world} process(es) but {trainer.world_size} are running, and "
            f"your DataLoader's position is per process; resume with {saved_world} (torchrun --nproc_per_node)"
        )
    meter = None
    if payload["position"] is not None and trainer.rank == 0:
        ranks = payload.get("per_rank") or [{"meter": payload["position"]["meter"]}]
        meter = merged_meter_state([saved["meter"] for saved in ranks])
    log.warning("resuming a checkpoint of %d process(es) on %d: training continues from optimizer step %d with "
                "the same data order, but not bit for bit (new per-process dropout and augmentation streams)",
                saved_world, trainer.world_size, payload["global_step"])  # fmt: skip
    return {"rng": None, "meter": meter}


def _restore(trainer: Trainer, payload: dict[str, Any], own: dict[str, Any] | None) -> None:
    """In today's order: weights and optimizer, schedule (and SWALR), average, scaler, counters,
    callbacks, data position, and the RNG streams last."""
    state = trainer.state
    callbacks = trainer.strategy.load_weights(trainer.model, trainer.optimizer, payload)  # [A0] a .dcp: collective
    trainer.schedule.load_state_dict(payload)
    trainer.averaging.load_state_dict(payload.get("average"), trainer.model)
    trainer.scaler.load_state_dict(payload["scaler"])
    position = payload["position"]
    if position is not None and own is not None:
        position = {**position, "meter": own["meter"]}
    # mid-epoch: the loop re-enters the epoch in progress and skips the batches already done
    state.epoch = payload["epoch"] - (1 if position is not None else 0)
    trainer.pending_position = position
    state.global_step = payload["global_step"]
    state.history = list(payload["history"])
    state.metrics = state.history[-1] if state.history else {}
    trainer.best_metric, trainer.best_epoch = payload["best_metric"], payload["best_epoch"]
    trainer.rollbacks = payload["rollbacks"]
    trainer.failed_saves = payload.get("failed_saves", 0)
    stop = payload.get("stop", {"requested": False, "reason": ""})
    state.stop_requested, state.stop_reason = stop["requested"], stop["reason"]
    for key, callback in zip(callback_keys(trainer.callbacks), trainer.callbacks):
        saved = callbacks.get(key, callbacks.get(type(callback).__name__))  # older keys
        if saved:
            callback.load_state_dict(saved)
    if payload.get("data") and hasattr(trainer.train_batches, "load_state_dict"):
        trainer.train_batches.load_state_dict(payload["data"])  # a StatefulDataLoader's position
    rng = own["rng"] if own is not None else payload["rng"]
    if rng is None:  # another world size: streams of (seed, step, rank)
        seed = distributed.rank_seed(trainer.config.seed + payload["global_step"], trainer.rank)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return
    restore_rng(rng, trainer.device)


def save(trainer: Trainer, *, epoch_complete: bool, is_best: bool) -> Path | None:
    """Save unless the weights are non-finite; a failed save never loses earlier checkpoints.

    Agreement point: every rank captures the payload and learns the outcome of the write
    (trainkit.distributed.strategies), so a failed save stops all ranks or none."""
    if trainer.checkpoints is None:
        return None
    if not trainer.strategy.weights_finite(trainer.model):
        log.error("not saving a checkpoint at step %d: the weights hold NaN/inf", trainer.state.global_step)
        return None
    step = None if epoch_complete else trainer.state.global_step
    payload = capture(trainer, epoch_complete=epoch_complete)
    path, message = trainer.strategy.save(trainer.model, trainer.optimizer, payload,
                                          lambda payload: write(trainer, payload, step, is_best))  # fmt: skip
    if message is None:
        return path
    trainer.failed_saves += 1
    if trainer.config.on_save_error == "stop":
        raise CheckpointError(message)
    log.error("%s; training continues (--on-save-error stop to stop instead)", message)
    return path  # the epoch's own file may have been written even when best.pt was not


def write(trainer: Trainer, payload: dict[str, Any], step: int | None, is_best: bool) -> tuple[Path | None, str | None]:
    """Write the checkpoint, then best.pt; disk full, permissions and I/O errors come back as a
    message (the old files stay intact), naming which of the two failed."""
    checkpoints, at = trainer.checkpoints, f"at step {trainer.state.global_step}"
    try:
        path = checkpoints.save(payload, epoch=trainer.state.epoch, step=step)
    except Exception as exc:
        return None, f"could not save a checkpoint {at}: {exc}; earlier checkpoints are intact"
    if not is_best:
        return path, None
    try:
        checkpoints.save_best(payload)
    except Exception as exc:
        best = checkpoints.best_path.name
        return path, f"saved {path.name} but could not update {best} {at}: {exc}; the previous {best} is intact"
    return path, None
