"""The train job end to end: data, model, init, Trainer, test once, summary and plots.

``trainkit train`` is a thin wrapper around ``train_run``; Python users can call it too.
The output directory holds ``config.json`` (resolved), ``history.csv``, ``checkpoints/``,
``loss.png``/``accuracy.png``/``lr.png``, ``model.safetensors`` (the final weights),
``best.safetensors`` (the best validation epoch's) and ``summary.json``.

Under ``--strategy ddp`` (one process per device, launched by torchrun) every rank runs
``train_run``; all ranks take part in every collective in the same order and only rank 0
writes files (docs/scaling.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from trainkit import distributed
from trainkit.callbacks import Callback, EarlyStopping
from trainkit.checkpoint import CheckpointDir, load_checkpoint, model_sha256
from trainkit.config import TrainConfig, config_from_dict
from trainkit.data import DatasetSplits, DeviceBatches, TensorSplit, load_dataset
from trainkit.errors import CheckpointError, ConfigError
from trainkit.init import init_weights
from trainkit.lr_finder import lr_find
from trainkit.memory import find_batch_size
from trainkit.optim import build_optimizer
from trainkit.models import build_model, enable_grad_checkpointing
from trainkit.plots import plot_history
from trainkit.trainer import Trainer, autocast_dtype, resolve_device

log = logging.getLogger("trainkit")

# Settings that may differ when resuming: where data lives and which device runs it.
RESUMABLE_OVERRIDES = ("data_dir", "device", "out", "strategy")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_out_dir(config: TrainConfig) -> Path:
    return Path("runs") / f"{config.dataset}-{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_model_from_config(config: TrainConfig, data: DatasetSplits) -> nn.Module:
    """The configured architecture, initialised with the configured scheme (seeded by the caller)."""
    options: dict[str, Any] = {"norm": config.norm, "dropout": config.dropout, "activation": config.activation}
    if config.model == "mlp":
        options["hidden"] = tuple(config.hidden)
        if config.norm_after_dropout:
            options["norm_after_dropout"] = True
    if config.model == "residual_mlp":
        options["drop_path"] = config.drop_path
    model = build_model(config.model, data.input_shape, data.num_classes, **options)
    model = init_weights(model, config.init)
    return enable_grad_checkpointing(model) if config.grad_checkpointing else model


def load_training_data(config: TrainConfig, device: torch.device) -> DatasetSplits:
    """The configured dataset and split; ``train_size`` keeps only the first N training images."""
    data = load_dataset(config.dataset, config.data_dir, val_size=config.val_size, seed=config.seed, device=device)
    if config.train_size is not None and config.train_size < len(data.train):
        data.train = TensorSplit(data.train.x[: config.train_size], data.train.y[: config.train_size])
    return data


def build_callbacks(config: TrainConfig) -> list[Callback]:
    if config.patience == 0:
        return []
    return [
        EarlyStopping(
            monitor=config.monitor, mode=config.monitor_mode, patience=config.patience, min_delta=config.min_delta
        )
    ]


def data_fingerprint(data: DatasetSplits) -> str:
    """Identifies the training data: a resume on other data would silently train something else."""
    digest = hashlib.sha256(f"{data.name}|{len(data.train)}|{len(data.val)}|{data.mean:.8f}|{data.std:.8f}".encode())
    digest.update(data.train.y.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that differ between two configs, ignoring where/how the run executes."""
    keys = sorted((set(saved) | set(current)) - set(RESUMABLE_OVERRIDES))
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in keys if saved.get(key) != current.get(key)]


def resume_config(out_dir: Path, overrides: dict[str, Any], *, force: bool = False) -> TrainConfig:
    """The saved config of the run in ``out_dir``; flags may only change where/how it runs (unless forced)."""
    saved_path = out_dir / "config.json"
    if not saved_path.is_file():
        raise ConfigError(f"--resume: {out_dir} holds no trainkit run (no config.json); check --out")
    saved = config_from_dict(json.loads(saved_path.read_text()), source=str(saved_path))
    changed = {k: v for k, v in overrides.items() if k not in RESUMABLE_OVERRIDES and getattr(saved, k) != v}
    if changed and not force:
        key, value = next(iter(changed.items()))
        raise ConfigError(
            f"--resume continues the run in {out_dir} with its saved settings, but --{key.replace('_', '-')} "
            f"{value} differs from the saved {getattr(saved, key)}; drop the flag, start a new run with "
            f"another --out, or pass --force-resume"
        )
    allowed = overrides if force else {k: v for k, v in overrides.items() if k in RESUMABLE_OVERRIDES}
    return config_from_dict({**saved.to_dict(), **allowed})


def prepare_out_dir(out_dir: Path, resume: bool, *, create: bool = True) -> None:
    """Create the output dir; refuse to overwrite a run, or to resume a finished one.

    ``create=False`` only checks (DDP: every rank checks before rank 0 creates anything).
    """
    if resume:
        if not (out_dir / "config.json").exists():
            raise ConfigError(f"--resume: {out_dir} holds no trainkit run (no config.json); check --out")
        if (out_dir / "summary.json").exists():
            raise ConfigError(f"--resume: the run in {out_dir} already finished (it has summary.json); use a new --out")
        return
    if (out_dir / "config.json").exists() or CheckpointDir(out_dir / "checkpoints").latest() is not None:
        raise ConfigError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    if create:
        out_dir.mkdir(parents=True, exist_ok=True)


def checkpoint_to_resume(
    out_dir: Path, config: TrainConfig, fingerprint: str, device: torch.device, *, force: bool
) -> dict[str, Any] | None:
    """The newest checkpoint that verifies, checked against this run's config and data (None: none yet)."""
    checkpoints = CheckpointDir(out_dir / "checkpoints")
    if not checkpoints.checkpoints():
        log.warning("--resume: %s has no checkpoint yet; starting the run from the beginning", out_dir)
        return None
    found = checkpoints.newest_valid(device)
    if found is None:
        raise CheckpointError(
            f"--resume: no checkpoint in {checkpoints.directory} verifies; inspect them with `trainkit inspect`"
        )
    path, payload = found
    log.info("resuming from %s", path)
    saved_world = payload.get("run_info", {}).get("world_size", 1)
    if saved_world != distributed.world_size():
        raise CheckpointError(
            f"--resume: {path} was written by {saved_world} process(es) but this run has {distributed.world_size()}; "
            f"resume with the same world size (e.g. torchrun --nproc_per_node {saved_world} ... --strategy ddp"
            f"{'' if saved_world > 1 else ', or without torchrun'})"
        )
    if force:
        return payload
    differences = config_differences(payload["config"], config.to_dict())
    if differences:
        raise CheckpointError(
            f"{path} was written with different settings ({'; '.join(differences)}); "
            f"resume with the same settings or pass --force-resume"
        )
    saved_fingerprint = payload.get("run_info", {}).get("data_fingerprint")
    if saved_fingerprint != fingerprint:
        raise CheckpointError(
            f"{path} was trained on different data (fingerprint {saved_fingerprint}, now {fingerprint}): "
            f"check --data-dir / --dataset, or pass --force-resume"
        )
    return payload


@contextmanager
def stop_cleanly_on_signals(trainer: Trainer) -> Iterator[None]:
    """SIGTERM/SIGINT: finish the step, save, exit. A second signal falls back to the default action."""
    previous = {}

    def handle(signum: int, frame: Any) -> None:
        trainer.request_interrupt(f"received {signal.Signals(signum).name}")
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_run(
    config: TrainConfig,
    *,
    resume: bool = False,
    force_resume: bool = False,
    extra_callbacks: Sequence[Callback] = (),
) -> dict:
    """Run the configured training job and return its summary (also written to summary.json).

    ``--strategy ddp`` (or auto under torchrun): every rank calls this inside one process group.
    """
    options = {"resume": resume, "force_resume": force_resume, "extra_callbacks": extra_callbacks}
    if distributed.resolve_strategy(config.strategy) == "single":
        return _train_run(config, **options)
    device = distributed.ddp_device(resolve_device(config.device))
    with distributed.process_group(device):
        return _train_run(dataclasses.replace(config, device=str(device)), **options)


def check_ddp_settings(config: TrainConfig, world_size: int) -> None:
    """--batch-size is the global batch under DDP: each rank takes batch_size / world_size of it."""
    if world_size == 1:
        return
    if config.batch_size == "auto":
        raise ConfigError("--batch-size auto is not supported with --strategy ddp; give the global batch size")
    if config.batch_size % world_size:
        raise ConfigError(
            f"--batch-size {config.batch_size} is the global batch and must be divisible by the "
            f"{world_size} processes; use e.g. --batch-size {max(1, config.batch_size // world_size) * world_size}"
        )


def training_batches(config: TrainConfig, data: DatasetSplits, *, rank: int = 0, world_size: int = 1) -> DeviceBatches:
    """The shuffled training batches; with world_size > 1, this rank's slice of each global batch."""
    return DeviceBatches(data.train.x, data.train.y, config.batch_size, seed=config.seed,
                         augment_shift=config.augment_shift, rank=rank, world_size=world_size)  # fmt: skip


def _train_run(
    config: TrainConfig, *, resume: bool, force_resume: bool, extra_callbacks: Sequence[Callback]
) -> dict:
    started = time.perf_counter()
    config = config.resolved()
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    check_ddp_settings(config, world)
    device = resolve_device(config.device)
    autocast_dtype(config.precision, device)  # fail on e.g. fp16 without CUDA before any work
    out_dir = Path(config.out) if config.out else default_out_dir(config)
    out_dir = Path(distributed.broadcast_object(str(out_dir)))  # the default name holds rank 0's clock
    config.out = str(out_dir)
    prepare_out_dir(out_dir, resume, create=False)
    distributed.barrier()  # every rank checked --out before rank 0 writes into it
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    # the model is the same on every rank (same seed); --batch-size auto is resolved before
    # config.json is written, so --resume reuses the choice
    config, data, model = seeded_data_and_model(config, device)
    if main:
        write_atomically(out_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    if world > 1:
        torch.manual_seed(distributed.rank_seed(config.seed, rank))  # dropout masks differ per rank
    train_batches = training_batches(config, data, rank=rank, world_size=world)
    finder = None
    if config.lr == "auto":
        # every rank runs the (unsharded, trace-free) range test; rank 0's suggestion is used by all
        found = resolve_auto_lr(config, model, training_batches(config, data), out_dir, reuse=resume, write=main)
        finder = distributed.broadcast_object(found)
        config = dataclasses.replace(config, lr=finder["suggested_lr"])
    fingerprint = data_fingerprint(data)
    resume_state = checkpoint_to_resume(out_dir, config, fingerprint, device, force=force_resume) if resume else None
    shard = {"rank": rank, "world_size": world, "lockstep": False}  # each rank evaluates its part; sums all-reduced
    val_batches = DeviceBatches(data.val.x, data.val.y, config.eval_batch_size, shuffle=False, **shard)
    callbacks = [*build_callbacks(config), *extra_callbacks]
    trainer = Trainer(
        model, config, callbacks=callbacks, out_dir=out_dir, run_info={"data_fingerprint": fingerprint}
    )
    log.info(
        "training %s on %s (%d train / %d val / %d test) on %s -> %s",
        config.model, config.dataset, len(data.train), len(data.val), len(data.test), device, out_dir,
    )  # fmt: skip
    with stop_cleanly_on_signals(trainer):
        history = trainer.fit(train_batches, val_batches, resume_from=resume_state)

    test = trainer.evaluate(DeviceBatches(data.test.x, data.test.y, config.eval_batch_size, shuffle=False, **shard))
    summary = summarise(trainer, history, test, wall_seconds=time.perf_counter() - started)
    if finder is not None:
        summary["lr_finder"] = {key: finder[key] for key in ("suggested_lr", "suggestions", "stopped_early")}
    if main:
        write_outputs(trainer, history, summary, out_dir)
    log.info(
        "test accuracy %.4f (loss %.4f), best epoch %s, %d epochs in %.1fs; wrote %s",
        summary["test_accuracy"], summary["test_loss"], summary["best_epoch"],
        summary["epochs_run"], summary["wall_seconds"], out_dir,
    )  # fmt: skip
    return summary


def write_outputs(trainer: Trainer, history: list[dict], summary: dict, out_dir: Path) -> None:
    """The final files: model/best safetensors, plots, summary.json (rank 0 only under DDP)."""
    export_safetensors(trainer.model.state_dict(), out_dir / "model.safetensors")
    if trainer.checkpoints is not None and trainer.checkpoints.best_path.is_file():
        export_safetensors(load_checkpoint(trainer.checkpoints.best_path)["model"], out_dir / "best.safetensors")
    plot_history(history, out_dir)
    write_atomically(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def resolve_auto_lr(
    config: TrainConfig, model: nn.Module, batches: DeviceBatches, out_dir: Path, *, reuse: bool = False,
    start_lr: float = 1e-7, end_lr: float = 10.0, num_iter: int = 100, write: bool = True,
) -> dict[str, Any]:
    """Run the LR range test on the training data (leaving no trace) and save lr_find.json/.png.

    ``reuse``: a resumed ``--lr auto`` run takes the suggestion it made the first time.
    ``write=False``: compute only (DDP ranks other than 0).
    """
    saved = out_dir / "lr_find.json"
    if reuse and saved.is_file():
        return json.loads(saved.read_text())
    optimizer = build_optimizer(
        config.optimizer, model, lr=start_lr, weight_decay=config.weight_decay, momentum=config.momentum
    )
    result = lr_find(
        model, optimizer, batches, nn.CrossEntropyLoss(), start_lr=start_lr, end_lr=end_lr, num_iter=num_iter,
        accumulate=config.accumulate, precision=config.precision,
    )  # fmt: skip
    found = result.to_dict()
    if not write:
        return found
    result.plot(out_dir / "lr_find.png")
    write_atomically(saved, json.dumps(found, indent=2) + "\n")
    log.info("lr finder: suggestions %s; using %.3g (%s)", found["suggestions"], found["suggested_lr"], saved)
    return found


def lr_find_run(config: TrainConfig, *, start_lr: float, end_lr: float, num_iter: int) -> dict[str, Any]:
    """`trainkit lr-find`: the range test alone, for the configured model and data."""
    config = dataclasses.replace(config, lr=1e-3 if config.lr == "auto" else config.lr).resolved()
    device = resolve_device(config.device)
    out_dir = Path(config.out) if config.out else Path("runs") / f"lr-find-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    config, data, model = seeded_data_and_model(config, device)
    found = resolve_auto_lr(config, model, training_batches(config, data), out_dir, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter)
    return {"out": str(out_dir), **{key: found[key] for key in ("suggested_lr", "suggestions", "stopped_early")}}


def seeded_data_and_model(config: TrainConfig, device: torch.device) -> tuple[TrainConfig, DatasetSplits, nn.Module]:
    """Threads, seeds, the data and the initialised model on ``device``, with --batch-size auto
    resolved: the start shared by train, profile and lr-find, so they see the same run."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    data = load_training_data(config, device)
    model = build_model_from_config(config, data).to(device)
    if config.batch_size == "auto":
        config = resolve_auto_batch_size(config, model, data)
    return config, data, model


def resolve_auto_batch_size(config: TrainConfig, model: nn.Module, data: DatasetSplits) -> TrainConfig:
    """--batch-size auto: the largest power of two that fits (trainkit.memory); logs the choice and why."""
    device = data.train.x.device
    choice = find_batch_size(model, config, data.train.x, data.train.y,
                             amp_dtype=autocast_dtype(config.precision, device))  # fmt: skip
    log.info("--batch-size auto: %d (%s)", choice.batch_size, choice.reason)
    return dataclasses.replace(config, batch_size=choice.batch_size)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def export_safetensors(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Weights in safetensors: loadable anywhere without unpickling anything."""
    tmp = path.with_name(f".{path.name}.tmp")
    state = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    save_file(state, str(tmp), metadata={"model_sha256": model_sha256(state)})
    os.replace(tmp, path)


def summarise(trainer: Trainer, history: list[dict], test: dict[str, float], *, wall_seconds: float) -> dict:
    stopper = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
    restored = stopper is not None and stopper.best_weights is not None
    return {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "best_epoch": stopper.best_epoch if restored else trainer.best_epoch,
        "best_val_metric": stopper.best if restored else trainer.best_metric,
        "monitor": trainer.config.monitor,
        "final_weights": "best epoch (restored by early stopping)" if restored else "last epoch",
        "epochs_run": len(history),
        "optimizer_steps": trainer.state.global_step,
        "stopped_early": trainer.state.stop_requested,
        "skipped_steps": sum(row.get("skipped_steps", 0) for row in history),
        "rollbacks": trainer.rollbacks,
        "wall_seconds": round(wall_seconds, 3),
        "model_sha256": model_sha256(trainer.model),
        "lr": trainer.config.lr,
        "seed": trainer.config.seed,
        "torch_version": str(torch.__version__),
    }


def evaluate_checkpoint(path: str | Path, *, data_dir: str | None = None, device: str = "auto") -> dict:
    """Test-set loss and accuracy of a checkpoint, rebuilt from the config stored in it."""
    payload = load_checkpoint(path)
    config = config_from_dict(payload["config"], source=str(path))
    if data_dir is not None:
        config.data_dir = data_dir
    config.device = device
    torch_device = resolve_device(device)
    data = load_dataset(config.dataset, config.data_dir, val_size=config.val_size, seed=config.seed, device=torch_device)
    model = build_model_from_config(config, data)
    model.load_state_dict(payload["model"])
    trainer = Trainer(model, config)
    test = trainer.evaluate(DeviceBatches(data.test.x, data.test.y, config.eval_batch_size, shuffle=False))
    return {"checkpoint": str(path), "epoch": payload["epoch"], "test_accuracy": test["accuracy"],
            "test_loss": test["loss"], "test_samples": len(data.test)}  # fmt: skip
