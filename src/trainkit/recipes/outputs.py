"""What a finished run leaves: the summary (test metrics, which weights), the best weights,
``model.safetensors``/``best.safetensors``, plots, and the lines that say how to go on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from trainkit import distributed
from trainkit.checkpoint.export import export_safetensors
from trainkit.checkpoint.file import all_finite, model_sha256
from trainkit.checkpoint.rundir import write_atomically  # fmt: skip
from trainkit.checkpoint.store import load_checkpoint  # fmt: skip
from trainkit.distributed import fsdp
from trainkit.errors import CheckpointError, NonFiniteLossError, OutputError
from trainkit.faults import crash_point
from trainkit.loop.averaging import evaluation_weights
from trainkit.loop.callbacks import EarlyStopping
from trainkit.loop.trainer import Trainer
from trainkit.recipes.components import RunData, rows_of  # fmt: skip
from trainkit.recipes.text.data import bits_per_token
from trainkit.tasks.metrics import finite_or_none, json_ready
from trainkit.tracking.plots import plot_history

log = logging.getLogger("trainkit")


def weights_were_validated(trainer: Trainer) -> bool:
    """Whether the final weights are the ones the last history row measured (not a restored
    epoch's, not SWA's average)."""
    stopper = early_stopping_of(trainer)
    return not (trainer.swa_applied or (stopper is not None and stopper.best_weights is not None))


def early_stopping_of(trainer: Trainer) -> EarlyStopping | None:
    return next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)


def text_summary(trainer: Trainer, history: list[dict], val: Any) -> dict[str, float]:
    """val_loss (mean nats per token over the whole validation split), in bits and as perplexity,
    for the final weights: the last history row when it measured them, else one more pass."""
    if val is None:
        return {}
    last = history[-1] if history else {}
    measured = {k.removeprefix("val_"): v for k, v in last.items() if k.startswith("val_")}
    if "loss" not in measured or not weights_were_validated(trainer):
        measured = trainer.evaluate(val)
    return {"val_loss": measured["loss"], "val_bits_per_token": bits_per_token(measured["loss"]),
            "val_perplexity": measured["perplexity"],
            **{f"val_{k}": v for k, v in measured.items() if k not in ("loss", "perplexity")}}  # fmt: skip


def split_sizes(data: RunData) -> str:
    sizes = [(name, getattr(data, name)) for name in ("train", "val", "test")]
    return " / ".join(f"{rows_of(split) or '?'} {name}" for name, split in sizes if split is not None)


def describe_test(summary: dict) -> str:
    """'test accuracy 0.98 (loss 0.07)'-style: every test metric, or that there was no test set."""
    tests = {key.removeprefix("test_"): value for key, value in summary.items() if key.startswith("test_")}
    if not tests and "val_bits_per_token" in summary:
        return f"val loss {summary['val_loss']:.4f} ({summary['val_bits_per_token']:.3f} bits/token)"
    if not tests:
        return "no test set"
    plain = {name: value for name, value in tests.items() if not name.startswith("tta_")}
    others = ", ".join(f"{name} {value:.4f}" for name, value in plain.items() if name != "loss")
    text = f"test {others} (loss {plain['loss']:.4f})" if others else f"test loss {plain['loss']:.4f}"
    augmented = ", ".join(f"{name.removeprefix('tta_')} {value:.4f}" for name, value in tests.items()
                          if name.startswith("tta_") and name != "tta_loss")  # fmt: skip
    return f"{text}; with test-time augmentation {augmented}" if augmented else text


def save_failures_note(summary: dict) -> str:
    """The end of the last log line when checkpoints could not be saved: a run must not look clean."""
    if not summary.get("failed_saves"):
        return ""
    best = "best.pt exists" if summary.get("best_checkpoint") else "there is no best.pt"
    return f"; WARNING: {summary['failed_saves']} checkpoint save(s) failed (see above), {best}"


def write_outputs(trainer: Trainer, history: list[dict], summary: dict, out_dir: Path,
                  final: dict[str, torch.Tensor] | None = None, *, plots: bool = True) -> None:  # fmt: skip
    """The final files: model/best safetensors, plots (unless off), summary.json (rank 0 only under DDP).
    ``final``: the whole final weights (default: the trainer's model's; see Trainer.full_state_dict).

    summary.json comes last and only once the weights are exported: if an export fails (disk
    full), ``--resume`` finishes the job from the last checkpoint instead of a finished-looking run.
    """
    crash_point("export")
    final = trainer.model.state_dict() if final is None else final
    if not all_finite(final):
        raise NonFiniteLossError("the final weights hold NaN/inf; nothing was exported. Lower --lr or check the data.")
    best = best_weights(trainer, final)
    summary["best_weights"] = None if best is None else best[1]
    exports = [(final, out_dir / "model.safetensors")] + ([(best[0], out_dir / "best.safetensors")] if best else [])
    for state, path in exports:
        try:
            export_safetensors(state, path)
        except OSError as exc:
            raise OutputError(f"could not write {path}: {exc.strerror or exc}; {how_to_finish(trainer, out_dir)}") from None
    try:
        if plots:
            plot_history(history, out_dir)
    except OSError as exc:
        log.warning("could not write the plots into %s: %s", out_dir, exc.strerror or exc)
    try:  # strict JSON: NaN/inf test or validation metrics are written as null
        write_atomically(out_dir / "summary.json", json.dumps(json_ready(summary), indent=2, allow_nan=False) + "\n")
    except OSError as exc:
        raise OutputError(f"could not write {out_dir / 'summary.json'}: {exc.strerror or exc}; "
                          f"{how_to_finish(trainer, out_dir)}") from None  # fmt: skip


def how_to_finish(trainer: Trainer, out_dir: Path) -> str:
    resume = f"`trainkit train --out {out_dir} --resume`"
    if trainer.checkpoints is not None and trainer.checkpoints.latest() is not None:
        return f"training is complete and its checkpoints are intact: free space, then {resume} finishes the export"
    return f"no checkpoint could be saved either: free space, then {resume} trains the run again from the start"


def best_weights(trainer: Trainer, final: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str] | None:
    """The best epoch's weights for best.safetensors and where they came from (None: no best epoch).

    ``best.pt`` when it verifies and holds the best epoch; else the same weights from early
    stopping's copy or the final model (when the last epoch was the best); else the newest
    checkpoint that verifies, named as such in the summary.
    """
    if trainer.checkpoints is None or trainer.best_epoch is None:
        return None
    best_file = trainer.checkpoints.best_path.name
    try:
        payload = load_checkpoint(trainer.checkpoints.best_path)
        if payload["epoch"] == trainer.best_epoch:
            return evaluation_weights(payload), f"checkpoints/{best_file} (epoch {trainer.best_epoch})"
        problem = f"{best_file} holds epoch {payload['epoch']}, not the best epoch {trainer.best_epoch} (saving it failed)"
    except CheckpointError as exc:
        problem = str(exc)
    stopper = early_stopping_of(trainer)
    copied = stopper is not None and stopper.best_weights is not None and not fsdp.holds_dtensors(stopper.best_weights)
    if copied and stopper.best_epoch == trainer.best_epoch:  # (a sharded copy is not whole on this rank)
        source = f"early stopping's copy of epoch {stopper.best_epoch}"
        weights = stopper.best_weights
    elif stopper is None and trainer.state.epoch == trainer.best_epoch and not trainer.swa_applied:
        source = f"the final weights (epoch {trainer.best_epoch}, the best)"
        weights = final
    else:
        found = trainer.checkpoints.newest_valid(set_aside=False)
        if found is None:
            log.warning("%s, and no checkpoint verifies: best.safetensors is not written", problem)
            return None
        source = f"checkpoints/{found[0].name} (epoch {found[1]['epoch']}, the newest valid checkpoint)"
        weights = evaluation_weights(found[1])
    log.warning("%s: best.safetensors holds %s instead", problem, source)
    return weights, source


def summarise(
    trainer: Trainer, history: list[dict], test: dict[str, float], tta: dict[str, float],
    final: dict[str, torch.Tensor] | None = None, *, wall_seconds: float,
) -> dict:  # fmt: skip
    """The run's summary.json; ``final``: the whole final weights (see Trainer.full_state_dict).
    The best epoch is one validated to a finite value, or None (never an unvalidated epoch, never inf)."""

    stopper = early_stopping_of(trainer)
    restored = stopper is not None and stopper.best_weights is not None
    return {
        **{f"test_{name}": value for name, value in sorted(test.items(), key=lambda item: item[0] == "loss")},
        **{f"test_tta_{name}": value for name, value in sorted(tta.items(), key=lambda item: item[0] == "loss")},
        "best_epoch": stopper.best_epoch if restored else trainer.best_epoch,
        "best_val_metric": finite_or_none(stopper.best if restored else trainer.best_metric),
        "monitor": trainer.config.monitor,
        "final_weights": trainer.describe_final_weights(stopper.best_epoch if restored else None),
        "epochs_run": len(history),
        "optimizer_steps": trainer.state.global_step,
        "stopped_early": trainer.state.stop_requested,
        "skipped_steps": sum(row.get("skipped_steps", 0) for row in history),
        "rollbacks": trainer.rollbacks,
        "failed_saves": trainer.failed_saves,
        "best_checkpoint": f"checkpoints/{trainer.checkpoints.best_path.name}" if has_best_checkpoint(trainer) else None,
        "wall_seconds": round(wall_seconds, 3),
        "model_sha256": distributed.broadcast_object(model_sha256(trainer.model if final is None else final)
                                                     if distributed.is_main() else None),  # rank 0 holds FSDP's whole weights
        "lr": trainer.lr,
        "seed": trainer.config.seed,
        "torch_version": str(torch.__version__),
    }


def has_best_checkpoint(trainer: Trainer) -> bool:
    return trainer.checkpoints is not None and trainer.checkpoints.best_path.exists()
