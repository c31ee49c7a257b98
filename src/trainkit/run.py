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
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainkit import distributed, fsdp
from trainkit.loop.averaging import evaluation_weights
from trainkit.callbacks import Callback, EarlyStopping
from trainkit.checkpoint import (
    BEST_FILE, CHECKPOINT_NAME, SET_ASIDE_SUFFIX, SHARDED_BEST, CheckpointDir, all_finite, damage_of, load_checkpoint,
    model_sha256, state_dict_mismatch,
)  # fmt: skip
from trainkit.batches import EpochBatches, as_epoch_batches
from trainkit.components import (
    RunData, build_model_from_config, build_run_task, check_samples, data_fingerprint, evaluation_data,
    load_training_data, rows_of, seeded_data_and_model, training_batches,
)  # fmt: skip
from trainkit.data import DatasetSplits
from trainkit.devices import resolve_device, run_device
from trainkit.config import LOOP_FIELDS, TrainConfig, config_from_dict, flag_name, is_factory_path
from trainkit.errors import CheckpointError, ConfigError, NonFiniteLossError, OutputError
from trainkit.export import SUFFIXES, export_model, export_safetensors
from trainkit.faults import crash_point
from trainkit.loggers import MLflowBackend, RunLogger, TensorBoardBackend, check_loggers
from trainkit.metrics import finite_or_none, json_ready
from trainkit.lr_finder import lr_find
from trainkit.optim import build_optimizer
from trainkit.plots import plot_history
from trainkit.precision import autocast_dtype, precision_for_inference
from trainkit.runs import FAILURE_FILE
from trainkit.rundir import holding_run_folder, read_json, remove_stale_temp_files, run_folder_of, write_atomically
from trainkit.schedules import build_scheduler
from trainkit.signals import GracefulStop, graceful_stop
from trainkit.checkpoint.sharded import is_sharded_checkpoint
from trainkit.runtime import map_tensors
from trainkit.tasks import Task
from trainkit.factories import build_user_model, factory_sources, require_named_factories
from trainkit.text.data import TextData, bits_per_token
from trainkit.text.generate import check_sampling, generate
from trainkit.text.models import build_sequence_model
from trainkit.text.tokenizers import tokenizer_from_state
from trainkit.tta import ShiftAveraged, require_images
from trainkit.loop.lr import schedule_spec
from trainkit.loop.trainer import Trainer

log = logging.getLogger("trainkit")

# Settings that may differ when resuming: where data lives (its content is checked by the fingerprint)
# and which device runs it.
# --num-workers: batches are fetched under their own seeds, bit-identical for any worker count;
# --threads: a requeue may land on a smaller machine (resume_config clamps it, with a note).
RESUMABLE_OVERRIDES = ("data_dir", "data_file", "device", "out", "plots", "strategy", "fsdp_offload", "fsdp_units",
                       "deterministic", "num_workers", "threads")
# The parts of the data fingerprint, by what an error calls them.
FINGERPRINT_PARTS = {"dataset": "dataset", "train_images": "training images", "train_labels": "training labels",
                     "val_images": "validation images", "val_labels": "validation labels",
                     "train_tokens": "training text or tokenizer", "val_tokens": "validation text or tokenizer"}  # fmt: skip


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


OLDER_FINGERPRINT = "an older trainkit's data fingerprint"  # fingerprint_differences' word for one it cannot compare


def fingerprint_differences(saved: Any, current: dict[str, str]) -> list[str]:
    """What differs between the data a checkpoint was trained on and the data loaded now."""
    if not isinstance(saved, dict):
        return [OLDER_FINGERPRINT]
    return [FINGERPRINT_PARTS.get(key, key) for key in current if saved.get(key) != current[key]]


def describe_data_change(changed: list[str]) -> str:
    """How a resume's data differ from the checkpoint's, as the end of a sentence about it."""
    if changed == [OLDER_FINGERPRINT]:
        return f"holds {OLDER_FINGERPRINT}, which cannot be compared with this data"
    return f"was trained on different data ({', '.join(changed)} differ)"


def known_settings(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Settings read from a run's own file (config.json, a checkpoint) without those this trainkit
    does not know: a setting removed or renamed later must not strand every older run."""
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        log.warning("%s holds setting(s) this trainkit does not know (%s); ignored", source, ", ".join(unknown))
    return {key: value for key, value in values.items() if key in known}


def fewer_threads_here(config: TrainConfig) -> TrainConfig:
    """A resumed run whose --threads exceeds this machine's cores (a requeue onto a smaller one) runs
    with the cores there are; CPU sums split by thread count, so its last bits may differ."""
    cores = os.cpu_count() or 1
    if config.threads is None or config.threads <= cores:
        return config
    log.warning("--resume: the run used --threads %d, this machine has %d cores; continuing with %d (results may "
                "differ from an uninterrupted run in the last bits)", config.threads, cores, cores)  # fmt: skip
    return dataclasses.replace(config, threads=cores)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that differ between two configs, ignoring where/how the run executes. A setting the
    saved config predates (an older trainkit's checkpoint) counts as its default; one this trainkit
    does not know is ignored (known_settings)."""
    defaults = TrainConfig().to_dict()
    keys = sorted(set(current) - set(RESUMABLE_OVERRIDES))
    was = {key: saved.get(key, defaults.get(key)) for key in keys}
    return [f"{key}: {was[key]!r} -> {current.get(key)!r}" for key in keys if was[key] != current.get(key)]


def resume_config(out_dir: Path, overrides: dict[str, Any], *, force: bool = False,
                  given: TrainConfig | None = None) -> TrainConfig:  # fmt: skip
    """The saved config of the run in ``out_dir``; flags may only change where/how it runs (unless forced).

    ``given`` (the command's own settings) stands in when the folder holds no config.json: a run
    killed in start-up, or one whose config.json was lost (its checkpoints are then checked
    against ``given``); see restart_state."""
    saved_path = out_dir / "config.json"
    if not saved_path.is_file():
        if given is None:
            raise ConfigError(f"--resume: {out_dir} holds no trainkit run (no config.json); check --out")
        return given
    saved = config_from_dict(known_settings(read_json(saved_path, "the run's settings"), str(saved_path)),
                             source=str(saved_path))  # fmt: skip
    changed = {k: v for k, v in overrides.items() if k not in RESUMABLE_OVERRIDES and getattr(saved, k) != v}
    if changed and not force:
        listed = "; ".join(f"{flag_name(k)} {v!r} (saved: {getattr(saved, k)!r})" for k, v in changed.items())
        raise ConfigError(
            f"--resume continues the run in {out_dir} with its saved settings, but these flags differ: {listed}; "
            f"drop them, start a new run with another --out, or pass --force-resume"
        )
    allowed = overrides if force else {k: v for k, v in overrides.items() if k in RESUMABLE_OVERRIDES}
    if allowed.get("threads", saved.threads) != saved.threads:
        log.warning("--resume: --threads %s where the run used %s: CPU sums split by thread count, so the result "
                    "may differ from an uninterrupted run in the last bits", allowed["threads"], saved.threads)  # fmt: skip
    return fewer_threads_here(config_from_dict({**saved.to_dict(), **allowed}))


def restart_state(out_dir: Path) -> str:
    """What the one restart command (`trainkit train ... --out DIR --resume`) finds in DIR:
    "finished" (summary.json), "started" (config.json or a checkpoint: continue it exactly) or
    "new" (nothing, or only what a run killed in start-up left: start it)."""
    checkpoints = CheckpointDir(out_dir / "checkpoints")
    if (out_dir / "summary.json").exists():
        return "finished"
    if (out_dir / "config.json").exists() or checkpoints.checkpoints() or checkpoints.best_path.exists() \
            or checkpoints.set_aside_files():  # fmt: skip
        return "started"
    return "new"


def prepare_out_dir(out_dir: Path, resume: bool) -> bool:
    """Refuse to overwrite a run (the caller holds the folder's lock). Returns whether the job
    resumes: ``--resume`` on a folder with no run yet starts it (restart_state)."""
    state = restart_state(out_dir)
    if resume:
        if state == "new":
            log.warning("--resume: %s holds no run yet; starting it", out_dir)
        return state != "new"
    if state != "new":
        raise ConfigError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    return False


def finished_summary(out_dir: Path) -> dict[str, Any]:
    """A finished run's summary: the restart command changes nothing and succeeds."""
    summary = read_json(out_dir / "summary.json", "the run's summary")
    log.info("--resume: the run in %s already finished (summary.json); nothing to do", out_dir)
    return summary


@contextmanager
def owning_run_folder(out_dir: Path) -> Iterator[None]:
    """Rank 0 locks the run folder for the whole job (creating it); every rank learns whether it could."""
    with ExitStack() as stack:
        problem = None
        if distributed.is_main():
            try:
                stack.enter_context(holding_run_folder(out_dir))
            except ConfigError as exc:
                problem = str(exc)
        problem = distributed.broadcast_object(problem)
        if problem is not None:
            raise ConfigError(problem)
        yield


def checkpoint_to_resume(
    out_dir: Path, config: TrainConfig, fingerprint: dict[str, str], model: nn.Module, *, force: bool,
) -> dict[str, Any] | None:  # fmt: skip
    """The newest usable checkpoint, checked against this run's config and data (None: none yet).

    Only a file that fails its own integrity check is renamed ``*.corrupt`` and skipped
    (``best.pt`` is the last resort); a file that cannot be read now or does not fit the model
    is a refusal that leaves the folder as it was.
    """
    checkpoints = CheckpointDir(out_dir / "checkpoints")
    if not checkpoints.checkpoints() and not checkpoints.best_path.exists():
        refuse_if_only_set_aside(checkpoints)
        log.warning("--resume: %s has no checkpoint yet; starting the run from the beginning", out_dir)
        return None
    main = distributed.is_main()
    found = checkpoints.newest_valid(check=lambda payload: check_fits_model(payload, model),
                                     include_best=True, set_aside=main, strict=True, weights=False)  # fmt: skip
    if found is None:
        raise CheckpointError(
            f"--resume: no checkpoint in {checkpoints.directory} is usable (each failed its integrity check and "
            f"was renamed *.corrupt); inspect them with `trainkit inspect`, or start a new run with another --out"
        )
    path, payload = found
    log.info("resuming from %s", path)
    if main and path != checkpoints.best_path:
        set_aside_damaged_best(checkpoints)
    warn_about_provenance(payload, path, config)
    differences = config_differences(known_settings(saved_settings(payload), str(path)), config.to_dict())
    changed_data = fingerprint_differences(payload["run_info"].get("data_fingerprint"), fingerprint)
    if force and (differences or changed_data):
        log.warning("--force-resume: continuing from %s although %s", path,
                    "; ".join([*(f"a setting differs ({d})" for d in differences),
                               *([f"it {describe_data_change(changed_data)}"] if changed_data else [])]))  # fmt: skip
    elif differences:
        raise CheckpointError(
            f"{path} was written with different settings ({'; '.join(differences)}); "
            f"resume with the same settings or pass --force-resume"
        )
    elif changed_data:
        raise CheckpointError(
            f"{path} {describe_data_change(changed_data)}: check --data-dir / --dataset, or pass --force-resume"
        )
    return payload


def warn_about_provenance(payload: dict[str, Any], path: Path, config: TrainConfig) -> None:
    """Exactness holds for the same trainkit, torch and factory code: say so when they differ."""
    import trainkit

    saved = payload.get("versions") or {}
    now = {"trainkit": trainkit.__version__, "torch": str(torch.__version__)}
    changed = [f"{name} {saved.get(name)} -> {version}" for name, version in now.items() if saved.get(name) != version]
    if changed:
        log.warning("%s was written by another version (%s): the resumed run may differ from an uninterrupted one",
                    path, ", ".join(changed))  # fmt: skip
    warn_if_factories_changed(payload, path, config)


def warn_if_factories_changed(payload: dict[str, Any], path: str | Path, config: TrainConfig) -> None:
    """A factory whose module's source changed since the checkpoint was written builds another model
    (ReLU edited to Tanh keeps every weight's name and shape): said, not refused."""
    saved = payload.get("run_info", {}).get("factory_sources") or {}
    now = factory_sources(config)
    changed = [f"{key} {getattr(config, key)}" for key, digest in now.items() if saved.get(key) not in (None, digest)]
    if changed:
        log.warning("the source of %s changed since %s was written: it may build another model or data than the "
                    "one trained", ", ".join(changed), path)  # fmt: skip


def refuse_if_only_set_aside(checkpoints: CheckpointDir) -> None:
    """Files set aside earlier are the run's progress in doubt: never start over silently beside them."""
    kept = checkpoints.set_aside_files()
    if kept:
        names = ", ".join(path.name for path in kept[:4]) + (", ..." if len(kept) > 4 else "")
        raise CheckpointError(
            f"--resume: {checkpoints.directory} holds no usable checkpoint, only files set aside earlier ({names}); "
            f"check them with `trainkit inspect`, rename one that verifies back without .corrupt to resume from it, "
            f"or move them away to start the run from the beginning"
        )


def check_fits_model(payload: dict[str, Any], model: nn.Module) -> None:
    mismatch = state_dict_mismatch(model, payload["model"])
    if mismatch is not None:
        raise CheckpointError(f"its weights do not fit this run's model ({mismatch})")


def set_aside_damaged_best(checkpoints: CheckpointDir) -> None:
    """A best.pt that fails its integrity check is renamed now, not found at the end of the run
    (one that cannot be read right now is left alone: the end of the run falls back past it)."""
    problem = damage_of(checkpoints.best_path) if checkpoints.best_path.exists() else None
    if problem is not None:
        done = checkpoints.set_aside(checkpoints.best_path)
        log.warning("%s; %s: best.safetensors will come from another source", problem, done)


def train_run(
    config: TrainConfig,
    *,
    resume: bool = False,
    force_resume: bool = False,
    extra_callbacks: Sequence[Callback] = (),
) -> dict:
    """Run the configured training job and return its summary (also written to summary.json).

    ``--strategy ddp`` (or auto under torchrun): every rank calls this inside one process group.
    SIGTERM/SIGINT at any moment stop it cleanly (trainkit.signals).
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


def checkpoint_model(
    path: str | Path, *, data_dir: str | None = None, device: str = "auto", factories: Factories | None = None,
) -> tuple[TrainConfig, RunData, nn.Module, dict]:  # fmt: skip
    """A checkpoint's model with its (evaluation) weights, and the config and data it was trained
    with, rebuilt from the settings stored in it (a user's model from its MODULE:FUNCTION factory,
    imported only when ``factories`` names or trusts it)."""
    payload = load_checkpoint(path)
    config = checkpoint_config(payload, path, factories or Factories())
    where = resolve_device(device)
    config = dataclasses.replace(config, device=device, data_dir=config.data_dir if data_dir is None else data_dir,
                                 precision=precision_for_inference(config.precision, where))  # fmt: skip
    config.validate()
    data = load_training_data(config, where)
    model = build_model_from_config(config, data)
    warn_if_factories_changed(payload, path, config)
    mismatch = state_dict_mismatch(model, payload["model"])
    if mismatch is not None:
        raise CheckpointError(f"{path}: its weights do not fit the model its settings describe ({mismatch})")
    model.load_state_dict(evaluation_weights(payload))
    return config, data, model, payload


@dataclasses.dataclass(frozen=True)
class Factories:
    """The MODULE:FUNCTION factories the user named for a command that reads a checkpoint
    (``--model``, ``--dataset``), and whether they trust the ones it names (``--trust-factories``)."""

    model: str | None = None
    dataset: str | None = None
    trust: bool = False

    def named(self) -> dict[str, str]:
        return {key: value for key, value in (("model", self.model), ("dataset", self.dataset)) if value is not None}


def checkpoint_config(payload: dict[str, Any], path: str | Path, factories: Factories) -> TrainConfig:
    """The settings stored in a checkpoint, with the factories the user named in their place; a
    factory named only inside the file is refused (trainkit.factories.require_named_factories)."""
    settings = {**known_settings(saved_settings(payload), f"checkpoint {path}"), **factories.named()}
    require_named_factories(settings, factories.named(), trust=factories.trust, source=f"checkpoint {path}")
    try:
        return config_from_dict(settings, source=f"the settings stored in {path}").resolved()
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def evaluate_checkpoint(path: str | Path, *, data_dir: str | None = None, device: str = "auto",
                        factories: Factories | None = None) -> dict:  # fmt: skip
    """Test-set loss and metrics of a checkpoint (the validation split's when there is no test set)."""
    config, data, model, payload = checkpoint_model(path, data_dir=data_dir, device=device, factories=factories)
    trainer = Trainer(model, config, task=build_run_task(config))
    split = "test" if getattr(data, "test", None) is not None else "val"
    evaluated = evaluation_data(config, data, split)
    if evaluated is None:
        raise ConfigError(f"{config.dataset} returned no test or validation data to evaluate {path} on")
    results = trainer.evaluate(evaluated)
    return {"checkpoint": str(path), "epoch": payload["epoch"], "split": split,
            **{f"test_{name}": value for name, value in sorted(results.items(), key=lambda item: item[0] == "loss")},
            "test_samples": rows_of(getattr(data, split))}  # fmt: skip


EXAMPLE_ROWS = 16  # the validation rows an export is verified on


def export_checkpoint(path: str | Path, *, format: str, out: str | Path | None = None, data_dir: str | None = None,
                      factories: Factories | None = None, overwrite: bool = False) -> dict:  # fmt: skip
    """`trainkit export`: the checkpoint's model (its EMA/SWA weights when it has them) in ``format``,
    verified on the first validation rows (trainkit.export); ``out`` defaults to the checkpoint's
    path with the format's suffix."""
    if format not in SUFFIXES:
        raise ConfigError(f"--format must be one of {', '.join(SUFFIXES)}, got {format!r}")
    target = Path(out) if out is not None else Path(path).with_suffix(SUFFIXES[format])
    check_export_target(target, Path(path), overwrite=overwrite)
    remove_stale_temp_files(target.parent)  # an export killed before: only trainkit's own marked temp names
    config, data, model, _ = checkpoint_model(path, data_dir=data_dir, device="cpu", factories=factories)
    split = "val" if getattr(data, "val", None) is not None else "test"
    evaluated = evaluation_data(config, data, split)
    if evaluated is None:
        raise ConfigError(f"{config.dataset} returned no validation or test data to verify the export on")
    batch = next(iter(as_epoch_batches(evaluated, batch_size=EXAMPLE_ROWS, shuffle=False).epoch(0, 0)))
    inputs = map_tensors(lambda tensor: tensor[:EXAMPLE_ROWS], build_run_task(config).split(batch)[0])
    return export_model(model, inputs, format, target, rebuild=lambda: build_model_from_config(config, data))


def check_export_target(target: Path, source: Path, *, overwrite: bool) -> None:
    """The checkpoint itself, or any file of a run folder's own, is never an export's target; another
    existing file is replaced only when the user asks (``--overwrite``)."""
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        raise ConfigError(f"--out {target} is the checkpoint being exported; choose another file")
    if is_run_folder_file(target):
        raise ConfigError(f"--out {target} is one of its run folder's own files; choose another name or folder")
    if target.exists() and not overwrite:
        raise ConfigError(f"--out {target} exists; pass --overwrite to replace it, or choose another file")


def is_run_folder_file(path: Path) -> bool:
    """A file a trainkit run folder owns (rundir.run_folder_of), except that an export may add a new
    file beside the checkpoints (its default: the checkpoint's name with the format's suffix)."""
    if run_folder_of(path) is None:
        return False
    in_checkpoints = path.resolve().parent.name == "checkpoints"
    return not in_checkpoints or bool(CHECKPOINT_NAME.match(path.name) or path.name in (BEST_FILE, SHARDED_BEST)
                                      or path.name.endswith(SET_ASIDE_SUFFIX))  # fmt: skip


def generate_from_checkpoint(
    path: str | Path, *, prompt: str, tokens: int = 200, temperature: float = 1.0, top_k: int | None = None,
    seed: int = 0, device: str = "auto", factories: Factories | None = None,
) -> str:  # fmt: skip
    """`trainkit generate`: a text run's model and tokenizer rebuilt from a checkpoint (a run
    folder: its newest checkpoint that verifies), then ``trainkit.text.generate``."""
    check_sampling(tokens, temperature, top_k)  # before any file is read
    path, payload = text_checkpoint(Path(path))
    tokenizer = tokenizer_from_state(payload["run_info"]["tokenizer"])
    config = checkpoint_config(payload, path, factories or Factories())
    model = (build_user_model(config.model, config.model_args) if is_factory_path(config.model)
             else build_sequence_model(config, tokenizer.vocab_size))  # fmt: skip
    mismatch = state_dict_mismatch(model, payload["model"])
    if mismatch is not None:
        raise CheckpointError(f"{path}: its weights do not fit the model its settings describe ({mismatch})")
    model.load_state_dict(evaluation_weights(payload))
    model.to(resolve_device(device))
    return generate(model, tokenizer, prompt, tokens=tokens, temperature=temperature, top_k=top_k, seed=seed,
                    context=config.block_size)  # fmt: skip


def text_checkpoint(path: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint at ``path`` (a file, a sharded folder, or a run folder: its newest valid one),
    refused unless it is a text run's."""
    if path.is_dir() and not is_sharded_checkpoint(path):
        found = CheckpointDir(path / "checkpoints").newest_valid(set_aside=False, include_best=True)
        if found is None:
            raise CheckpointError(f"{path} holds no checkpoint that verifies: is it a trainkit run folder?")
        path, payload = found
    else:
        payload = load_checkpoint(path)
    if "tokenizer" not in payload.get("run_info", {}):
        raise CheckpointError(f"{path} is not a --dataset text run's checkpoint (it stores no tokenizer)")
    return path, payload


def saved_settings(payload: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's full settings: the loop's (``config``) and the recipe's around it (``run_info``)."""
    return {**payload.get("run_info", {}).get("recipe", {}), **payload["config"]}


def recipe_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings the Trainer does not see (data, model and their options), kept in run_info."""
    return {key: value for key, value in config.to_dict().items() if key not in LOOP_FIELDS}
