"""`trainkit tune`: hyper-parameter search with Optuna as the engine and trainkit runs as trials.

Each trial is an ordinary run folder (``DIR/trials/NNNN``: checkpoints, history, summary) whose
number is the Optuna trial's; the study lives in Optuna's storage (``DIR/study.db``, SQLite, by
default). Because trainkit runs resume exactly, the search does too: kill the tuner at any moment,
run the same command again, and a trial that was running continues from its own checkpoint under
its own number (trainkit.tune.study). Optuna is an optional extra: ``pip install 'trainkit[tune]'``.
Layout: ``space`` (the space file), ``study`` (settings, storage, claims), ``trials`` (one worker's
loop and the pruning callback), ``workers`` (``--workers K``), ``results`` (best.toml, report).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainkit.errors import ConfigError, TrainingInterrupted, TrainkitError
from trainkit.tune.names import PRUNERS, SAMPLERS

if TYPE_CHECKING:
    from trainkit.config.schema import TrainConfig

__all__ = ["tune", "SAMPLERS", "PRUNERS"]
TUNE_MODULES = ("optuna", "tomli_w")  # what pyproject.toml's `tune` extra brings: the engine, best.toml's writer
INSTALL_HINT = "trainkit tune needs the Python module {module} (not installed): pip install 'trainkit[tune]'"


def require_optuna() -> None:
    """Import the `tune` extra's modules before any work, so that a missing one (or a module one of
    them needs) is named with the extra that brings it, not reported as Optuna whatever it is."""
    for module in TUNE_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise TrainkitError(INSTALL_HINT.format(module=exc.name or module)) from None


def tune(
    base: Mapping[str, Any] | TrainConfig,
    space: Mapping[str, Any] | str | Path,
    *,
    trials: int,
    out: str | Path,
    sampler: Any = "tpe",
    pruner: Any = "median",
    storage: str | None = None,
    study_name: str | None = None,
    workers: int = 1,
    sampler_seed: int = 0,
) -> dict[str, Any]:
    """Run (or continue) the study in ``out`` until it holds ``trials`` trials; returns its outcome.

    ``base``: the settings every trial starts from (a config file's keys, e.g. ``{"dataset": "mnist",
    "epochs": 5}``, or a TrainConfig); ``space``: the space tables (trainkit.tune.space) or a space
    file. ``sampler``: tpe, random or grid; ``pruner``: median, hyperband or none (or Optuna
    objects, one worker only).
    """
    require_optuna()
    from trainkit.config.files import load_config_file
    from trainkit.checkpoint.rundir import waiting_for_lock
    from trainkit.tune.results import toml_settings, write_results
    from trainkit.tune.study import CLAIM_LOCK, TuneSpec, default_threads, open_study, prepare_spec, record_study
    from trainkit.tune.trials import RESUME_ADVICE, work
    from trainkit.tune.workers import run_workers

    check_workers(workers, sampler, pruner)
    base = given_settings(base)
    space_tables = load_config_file(space, what="--space") if isinstance(space, (str, Path)) else space
    if not isinstance(space_tables, Mapping):
        raise ConfigError(f"the space must be a mapping of tables or a space file, got {type(space_tables).__name__}")
    given = {"plots": False, "threads": default_threads(workers), **base}  # trials draw no PNGs unless asked
    spec = prepare_spec(TuneSpec(base=given, space=dict(space_tables), trials=trials, out=str(out), sampler=sampler,
                                 pruner=pruner, storage=storage, study_name=study_name, sampler_seed=sampler_seed))  # fmt: skip
    toml_settings(spec.base)  # a base best.toml could not hold is refused now, not after the last trial
    try:
        with waiting_for_lock(spec.folder / CLAIM_LOCK):  # two commands starting at once create the study once
            # first: a storage that cannot be opened, or a study of another folder or other settings,
            # leaves no tune.json behind
            record_study(spec, open_study(spec))
        if workers == 1:
            work(spec)
        else:
            run_workers(spec, workers)
        return write_results(spec, open_study(spec))
    except TrainingInterrupted as exc:  # whenever it came: the study continues where it stopped
        raise TrainingInterrupted(str(exc), checkpoint=exc.checkpoint, advice=RESUME_ADVICE) from None


def given_settings(base: Mapping[str, Any] | TrainConfig) -> dict[str, Any]:
    """A mapping of settings as given, or a TrainConfig's settings that differ from the defaults."""
    from trainkit.config.schema import TrainConfig

    if isinstance(base, TrainConfig):
        defaults = TrainConfig().to_dict()
        return {key: value for key, value in base.to_dict().items() if value != defaults[key]}
    if not isinstance(base, Mapping):
        raise ConfigError(f"tune(base=...) takes a mapping of settings or a TrainConfig, got {type(base).__name__}")
    return dict(base)


def check_workers(workers: Any, sampler: Any, pruner: Any) -> None:
    import os

    cores = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= cores:
        raise ConfigError(f"--workers must be an integer in 1..{cores} (the CPU cores here), got {workers!r}")
    if workers > 1 and not (isinstance(sampler, str) and isinstance(pruner, str)):
        raise ConfigError("Optuna sampler/pruner objects work with one worker; give their names for --workers > 1")
