"""The train job end to end: data, model, init, Trainer, test once, summary and plots.

``trainkit train`` is a thin wrapper around ``train_run``; Python users can call it too.
The output directory holds ``config.json`` (resolved), ``history.csv``, ``checkpoints/``,
``loss.png``/``accuracy.png``/``lr.png``, ``model.safetensors`` (the final weights),
``best.safetensors`` (the best validation epoch's) and ``summary.json``.

Under ``--strategy ddp`` (one process per device, launched by torchrun) every rank runs
``train_run``; all ranks take part in every collective in the same order and only rank 0
writes files (docs/scaling.md).

Its parts: ``resume`` (which checkpoint, which settings), ``outputs`` (the summary and files a
finished run leaves) and ``from_checkpoint`` (evaluate, export, generate).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainkit import distributed
from trainkit.checkpoint.rundir import holding_run_folder, read_json, write_atomically  # fmt: skip
from trainkit.checkpoint.signals import GracefulStop, graceful_stop
from trainkit.config.schema import LOOP_FIELDS, TrainConfig
from trainkit.data.epochs import EpochBatches
from trainkit.devices import resolve_device, run_device
from trainkit.distributed import fsdp
from trainkit.errors import ConfigError
from trainkit.faults import crash_point
from trainkit.loop.callbacks import Callback, EarlyStopping
from trainkit.loop.lr import schedule_spec
from trainkit.loop.trainer import Trainer
from trainkit.optim.lr_finder import lr_find
from trainkit.optim.optimizers import build_optimizer
from trainkit.optim.schedules import build_scheduler
from trainkit.precision import autocast_dtype
from trainkit.recipes.components import (
    RunData,
    build_run_task,
    check_samples,
    data_fingerprint,
    evaluation_data,
    seeded_data_and_model,
    training_batches,
)  # fmt: skip
from trainkit.recipes.factories import factory_sources
from trainkit.recipes.images import DatasetSplits
from trainkit.recipes.outputs import (
    describe_test,
    save_failures_note,
    split_sizes,
    summarise,
    text_summary,
    write_outputs,
)  # fmt: skip
from trainkit.recipes.resume import (
    checkpoint_to_resume,
    finished_summary,
    owning_run_folder,
    prepare_out_dir,
    restart_state,
)  # fmt: skip
from trainkit.recipes.text.data import TextData
from trainkit.recipes.tta import ShiftAveraged, require_images
from trainkit.tasks.base import Task
from trainkit.tracking.loggers import MLflowBackend, RunLogger, TensorBoardBackend, check_loggers
from trainkit.tracking.runs import FAILURE_FILE

log = logging.getLogger("trainkit")


def default_out_dir(config: TrainConfig, prefix: str | None = None) -> Path:
    """runs/<dataset>-<model>-<time>, created here so that two runs started in the same second (a
    sweep script) never share it: the second takes the name with -2, -3, ..."""
    name = prefix or f"{config.dataset}-{config.model}".replace(":", ".").replace("/", ".")  # MODULE:FUNCTION factories
    base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise ConfigError(f"{base} and 998 more names like it exist; pass --out")


def build_callbacks(config: TrainConfig) -> list[Callback]:
    if config.patience == 0:
        return []
    return [
        EarlyStopping(
            monitor=config.monitor, mode=config.monitor_mode, patience=config.patience, min_delta=config.min_delta
        )
    ]


def build_run_logger(config: TrainConfig, out_dir: Path, *, enabled: bool) -> RunLogger | None:
    """The TensorBoard/MLflow logger of --logger (None for csv alone); under DDP only rank 0 writes."""
    backends = []
    for name in check_loggers(config.logger):
        if name == "tensorboard":
            backends.append(TensorBoardBackend(out_dir))
        else:
            backends.append(MLflowBackend(out_dir, config.mlflow_uri, config.mlflow_experiment, run_name=out_dir.name))
    if not backends:
        return None
    return RunLogger(backends, every_steps=config.log_every_steps, clip_norm=config.clip_norm, enabled=enabled)


def finish_logging(run_logger: RunLogger, config: TrainConfig, summary: dict, out_dir: Path) -> None:
    """The settings and final numbers, the weights and the plots, after the run's own files exist. A
    tracking store that fails now only warns: the run itself is complete."""
    settings = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                for key, value in config.to_dict().items()}  # fmt: skip
    final = {key: float(value) for key, value in summary.items()
             if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}  # fmt: skip
    files = [out_dir / "model.safetensors", out_dir / "summary.json", *sorted(out_dir.glob("*.png"))]
    try:
        run_logger.finish(settings, final, [path for path in files if path.is_file()])
    except Exception as exc:  # noqa: BLE001 - any backend's error; the run's files are already written
        log.warning("could not finish the logged run (%s: %s); its steps and epochs are logged",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip


@contextmanager
def noting_failure(out_dir: Path, main: bool) -> Iterator[None]:
    """A job that ends on an error leaves OUT/failure.json (`trainkit runs` shows it as failed); a
    stop (SIGTERM, Ctrl-C) leaves none: it is interrupted and resumable. A later success removes it."""
    try:
        yield
    except Exception as exc:  # a stop is a BaseException (TrainingInterrupted, KeyboardInterrupt): not caught
        if main and (out_dir / "config.json").is_file():
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            write_atomically(out_dir / FAILURE_FILE, json.dumps({"error": first_line, "type": type(exc).__name__}) + "\n")
        raise
    if main:
        (out_dir / FAILURE_FILE).unlink(missing_ok=True)


def train_run(
    config: TrainConfig,
    *,
    resume: bool = False,
    force_resume: bool = False,
    extra_callbacks: Sequence[Callback] = (),
) -> dict:
    """Run the configured training job and return its summary (also written to summary.json).

    ``--strategy ddp`` (or auto under torchrun): every rank calls this inside one process group.
    SIGTERM/SIGINT at any moment stop it cleanly (trainkit.checkpoint.signals).
    """
    options = {"resume": resume, "force_resume": force_resume, "extra_callbacks": extra_callbacks}
    with graceful_stop() as guard, keeping_thread_count():
        guard.resumable = resume
        if distributed.resolve_strategy(config.strategy) == "single":
            return _train_run(config, guard=guard, **options)
        device = distributed.ddp_device(resolve_device(config.device))
        with distributed.process_group(device):
            return _train_run(dataclasses.replace(config, device=str(device)), guard=guard, **options)


@contextmanager
def keeping_thread_count() -> Iterator[None]:
    """A job's --threads is its own: the next job in the process (a notebook, the tests) starts with
    the thread count it found, since CPU sums split by it and a leaked count changes its weights."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


def check_schedule(config: TrainConfig, batches: EpochBatches) -> None:
    """Build the schedule once on a stand-in optimizer: every schedule error is raised before any file is written."""
    steps_per_epoch = math.ceil(len(batches) / config.accumulate)
    if steps_per_epoch == 0:
        raise ConfigError("the training data yields no batch: is it empty, or smaller than one batch?")
    if config.accumulate > len(batches):  # one step an epoch, over fewer micro-batches than --lr-scaling assumes
        raise ConfigError(f"--accumulate {config.accumulate} is more than the {len(batches)} batches an epoch has; "
                          f"use at most {len(batches)}, or a smaller --batch-size")  # fmt: skip
    lr = 1.0 if config.lr == "auto" else config.lr  # auto: the finder's lr is not known yet
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=max(lr, config.min_lr))
    total = steps_per_epoch * config.epochs if config.max_steps is None else config.max_steps
    build_scheduler(schedule_spec(config, steps_per_epoch, total), optimizer, total_steps=total)


def _train_run(
    config: TrainConfig, *, resume: bool, force_resume: bool, extra_callbacks: Sequence[Callback], guard: GracefulStop
) -> dict:
    started = time.perf_counter()
    config = config.resolved()
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    check_ddp_settings(config, world)
    device = run_device(config.device, deterministic=config.deterministic, tf32=config.tf32)
    autocast_dtype(config.precision, device)  # fail on e.g. fp16 without CUDA before any work
    fsdp.check_offload(config.fsdp_offload, device)
    out_dir = Path(config.out) if config.out else default_out_dir(config) if main else None
    out_dir = Path(distributed.broadcast_object(str(out_dir)))  # the default name is rank 0's (its clock, its folder)
    config.out = str(out_dir)
    if resume and restart_state(out_dir) == "finished":  # final: read without the lock, so nothing changes
        return finished_summary(out_dir)
    with owning_run_folder(out_dir), ExitStack() as failures:
        resume = prepare_out_dir(out_dir, resume)
        guard.resumable = resume
        if not resume:  # only now is the folder this job's (a resumed one: once its checkpoint is accepted)
            failures.enter_context(noting_failure(out_dir, main))
        crash_point("start")
        # the model is the same on every rank (same seed); --batch-size auto is resolved before
        # config.json is written, so --resume reuses the choice
        config, data, model = seeded_data_and_model(config, device)
        if world > 1:
            torch.manual_seed(distributed.rank_seed(config.seed, rank))  # dropout masks differ per rank
        train_batches = training_batches(config, data, rank=rank, world_size=world)
        check_schedule(config, train_batches)
        task = build_run_task(config)
        check_samples(task, data, model)
        check_tta(config, data, task)
        saved_config = json.dumps(config.to_dict(), indent=2) + "\n"  # as given: lr "auto" stays "auto"
        if main and not resume:  # every check that needs no training passed: only now does the folder hold a run
            write_atomically(out_dir / "config.json", saved_config)
        guard.resumable = True
        finder = None
        if config.lr == "auto":
            # every rank runs the (unsharded, trace-free) range test; rank 0's suggestion is used by all
            found = resolve_auto_lr(config, model, training_batches(config, data), out_dir, reuse=resume, write=main,
                                    task=task)  # fmt: skip
            finder = distributed.broadcast_object(found)
            config = dataclasses.replace(config, lr=finder["suggested_lr"])
        fingerprint = data_fingerprint(data)
        resume_state = None
        if resume:
            resume_state = checkpoint_to_resume(out_dir, config, fingerprint, model, force=force_resume)
            failures.enter_context(noting_failure(out_dir, main))  # a refusal above changed nothing in the folder
            if main:  # accepted: config.json now says what trains from here on (--force-resume may change it)
                write_atomically(out_dir / "config.json", saved_config)
        shard = {"rank": rank, "world_size": world}  # each rank evaluates its part; sums all-reduced
        run_logger = build_run_logger(config, out_dir, enabled=main)
        callbacks = [*build_callbacks(config), *extra_callbacks, *([run_logger] if run_logger else [])]  # it logs last
        trainer = Trainer(
            model, config, task=task, callbacks=callbacks, out_dir=out_dir,
            run_info={"data_fingerprint": fingerprint, "recipe": recipe_settings(config), **tokenizer_info(data),
                      "factory_sources": factory_sources(config)},
        )
        log.info("training %s on %s (%s) on %s -> %s", config.model, config.dataset, split_sizes(data), device, out_dir)
        with guard.deferred_to(trainer):
            history = trainer.fit(train_batches, evaluation_data(config, data, "val", **shard), resume_from=resume_state)

        test_data = evaluation_data(config, data, "test", **shard)
        test = trainer.evaluate(test_data) if test_data is not None else {}
        tta = test_time_augmented(trainer, test_data, data) if config.tta and test_data is not None else {}
        final = trainer.full_state_dict()  # under FSDP a collective: the whole weights on rank 0
        summary = summarise(trainer, history, test, tta, final, wall_seconds=time.perf_counter() - started)
        if isinstance(data, TextData):
            summary.update(text_summary(trainer, history, evaluation_data(config, data, "val", **shard)))
        if finder is not None:
            summary["lr_finder"] = {key: finder[key] for key in ("suggested_lr", "suggestions", "stopped_early")}
        if run_logger is not None:
            summary["logs"] = run_logger.describe()
        if main:
            write_outputs(trainer, history, summary, out_dir, final, plots=config.plots)
        if run_logger is not None:
            finish_logging(run_logger, config, summary, out_dir)
    log.info(
        "%s, best epoch %s, %d epochs in %.1fs; wrote %s%s",
        describe_test(summary), summary["best_epoch"], summary["epochs_run"], summary["wall_seconds"], out_dir,
        save_failures_note(summary),
    )  # fmt: skip
    return summary


def tokenizer_info(data: RunData) -> dict[str, Any]:
    """A text run's checkpoints carry its tokenizer: generate and evaluate decode with it."""
    return {"tokenizer": data.tokenizer.state_dict()} if isinstance(data, TextData) else {}


def test_time_augmented(trainer: Trainer, test_data: Any, data: RunData) -> dict[str, float]:
    """The test metrics of the final model with --tta shifts (logits averaged over shifted views)."""
    fill = float(data.train.x.min()) if isinstance(data, DatasetSplits) else 0.0  # the background, as --augment fills
    return trainer.evaluate(test_data, model=ShiftAveraged(trainer.model, fill=fill))


def check_tta(config: TrainConfig, data: RunData, task: Task) -> None:
    """--tta shifts needs image inputs: refused before training, not after it."""
    if config.tta is None:
        return
    if isinstance(data, TextData):
        raise ConfigError("--tta shifts shifts images; --dataset text has none")
    if isinstance(data, DatasetSplits):
        require_images(data.train.x[:1])
        return
    try:
        sample = data.train[0]
    except (TypeError, IndexError, KeyError):
        return  # an iterable dataset: checked on the first test batch
    inputs = task.split(sample)[0]
    require_images(inputs[None] if isinstance(inputs, torch.Tensor) else inputs)


def resolve_auto_lr(
    config: TrainConfig, model: nn.Module, batches: EpochBatches, out_dir: Path, *, reuse: bool = False,
    start_lr: float = 1e-7, end_lr: float = 10.0, num_iter: int = 100, write: bool = True, task: Task | None = None,
) -> dict[str, Any]:
    """Run the LR range test on the training data (leaving no trace) and save lr_find.json/.png.

    ``reuse``: a resumed ``--lr auto`` run takes the suggestion it made the first time.
    ``write=False``: compute only (DDP ranks other than 0).
    """
    saved = out_dir / "lr_find.json"
    if reuse and saved.is_file():
        return read_json(saved, "the LR finder's result")
    optimizer = build_optimizer(
        config.optimizer, model, lr=1e-3, weight_decay=config.weight_decay, momentum=config.momentum,  # lr_find sets each lr
        fused=config.fused_optimizer,
    )
    result = lr_find(
        model, optimizer, batches, task or build_run_task(config), start_lr=start_lr, end_lr=end_lr, num_iter=num_iter,
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
    device = run_device(config.device, deterministic=config.deterministic, tf32=config.tf32)
    out_dir = Path(config.out) if config.out else default_out_dir(config, prefix="lr-find")
    with holding_run_folder(out_dir), keeping_thread_count():
        if restart_state(out_dir) != "new":  # its lr_find.json is what a --lr auto run resumes with
            raise ConfigError(f"--out {out_dir} holds a training run; lr-find would replace the lr_find.json it "
                              f"trained with: choose another --out")  # fmt: skip
        config, data, model = seeded_data_and_model(config, device)
        found = resolve_auto_lr(config, model, training_batches(config, data), out_dir, start_lr=start_lr,
                                end_lr=end_lr, num_iter=num_iter)  # fmt: skip
    return {"out": str(out_dir), **{key: found[key] for key in ("suggested_lr", "suggestions", "stopped_early")}}


def recipe_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings the Trainer does not see (data, model and their options), kept in run_info."""
    return {key: value for key, value in config.to_dict().items() if key not in LOOP_FIELDS}
