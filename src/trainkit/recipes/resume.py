"""Resuming a run folder: which checkpoint, with which settings (what may change on a resume and
what may not), whether the data is the same, and what a restart command finds there
(nothing, a run in progress, a finished run).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainkit import distributed
from trainkit.checkpoint.file import state_dict_mismatch
from trainkit.checkpoint.rundir import holding_run_folder, read_json  # fmt: skip
from trainkit.checkpoint.store import CheckpointDir, damage_of  # fmt: skip
from trainkit.config.files import config_from_dict
from trainkit.config.names import flag_name
from trainkit.config.schema import TrainConfig
from trainkit.errors import CheckpointError, ConfigError
from trainkit.recipes.factories import factory_sources

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


def saved_settings(payload: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's full settings: the loop's (``config``) and the recipe's around it (``run_info``)."""
    return {**payload.get("run_info", {}).get("recipe", {}), **payload["config"]}
