"""The study: its settings (``DIR/tune.json`` and the storage), its Optuna storage, and claiming trials safely.

Optuna's storage is the one record of the search; trainkit adds what makes it crash-safe. A trial
is a run folder ``DIR/trials/NNNN`` (its number), locked by the process training it. A trial that
is RUNNING in the study while its owner is provably gone was being trained by a process that
died (SIGKILL, a lost machine): the next worker to claim a trial resumes it from its own
checkpoints, under the same number, instead of asking Optuna for a new one. Claims happen one at
a time under ``DIR/.claim.lock``, and a worker locks the trial's folder before it lets go of that
lock, so no two workers, processes or commands ever take the same trial.

The claim lock and the trial folders are per folder, so a study belongs to one folder: the storage
records that folder and the study's settings (a study user attribute), and each trial records its
owner (folder, host, PID). A command from another folder, or with other settings, is refused
before it touches a trial; a study started by an older trainkit is adopted by the folder whose
tune.json agrees.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainkit.config.files import recipe_config
from trainkit.config.names import MAX_SEED
from trainkit.errors import ConfigError, first_line
from trainkit.recipes.resume import RESUMABLE_OVERRIDES, config_differences
from trainkit.checkpoint.rundir import _is_other_live_process, is_locked, lock_run_folder, read_json, waiting_for_lock
from trainkit.checkpoint.rundir import write_atomically
from trainkit.tune.names import PRUNERS, SAMPLERS
from trainkit.tune.space import Dimension, grid_space, parse_space

STUDY_FILE = "tune.json"
CLAIM_LOCK = ".claim.lock"
SQLITE_TIMEOUT_S = 60  # workers writing to one SQLite file wait for each other this long
# What tune.json records and a later command must repeat (the trial budget and workers may change).
STUDY_KEYS = ("base", "space", "monitor", "direction", "sampler", "pruner", "sampler_seed", "storage", "study_name")
# What the storage records of those (its URL and the study's name are where the study is, and one
# database may be reached by several URLs), under the study user attribute STUDY_ATTR.
STORAGE_KEYS = tuple(key for key in STUDY_KEYS if key not in ("storage", "study_name"))
STUDY_ATTR = "trainkit_study"  # {"folder": the owning folder, resolved; "settings": STORAGE_KEYS' values}
OWNER_ATTR = "owner"  # a trial's user attribute: who trains it, {"folder", "host", "pid"}


@dataclass
class TuneSpec:
    """Everything a worker needs to take part in the study (what tune.json holds, plus this
    command's budget). ``sampler``/``pruner`` are names, or Optuna objects from Python (one worker)."""

    base: dict[str, Any]
    space: dict[str, Any]
    trials: int
    out: str
    sampler: Any = "tpe"
    pruner: Any = "median"
    storage: str | None = None
    study_name: str | None = None
    sampler_seed: int = 0
    monitor: str = ""
    direction: str = ""
    dimensions: list[Dimension] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return Path(self.out)

    @property
    def home(self) -> str:
        """The study folder resolved: the same for every command and worker that shares it, whatever
        their working directory, so it identifies the study's owner in the storage."""
        return str(self.folder.resolve())

    def where(self) -> str:
        return f"study {self.study_name!r} in {self.storage}"

    def recorded(self) -> dict[str, Any]:
        """The study's identity, as tune.json stores it (objects by their class name)."""
        values = {key: getattr(self, key) for key in STUDY_KEYS}
        for key in ("sampler", "pruner"):
            if not isinstance(values[key], str):
                values[key] = type(values[key]).__name__
        values["base"] = {k: v for k, v in self.base.items() if k not in (*RESUMABLE_OVERRIDES, "threads")}
        return json.loads(json.dumps(values, default=str))


def prepare_spec(spec: TuneSpec) -> TuneSpec:
    """Check every setting before any trial: the base run, the space against it, the objective,
    the sampler and pruner; fill in the defaults (objective, storage, study name)."""
    if isinstance(spec.trials, bool) or not isinstance(spec.trials, int) or spec.trials < 1:
        raise ConfigError(f"--trials must be an integer >= 1, got {spec.trials!r}")
    seed = spec.sampler_seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - spec.trials:
        raise ConfigError(f"--sampler-seed must be an integer in 0..{MAX_SEED - spec.trials}, got {spec.sampler_seed!r}")
    if spec.storage is not None and not isinstance(spec.storage, str):
        raise ConfigError(f"--storage must be an Optuna storage URL, got {type(spec.storage).__name__}")
    for name, value, names in (("--sampler", spec.sampler, SAMPLERS), ("--pruner", spec.pruner, PRUNERS)):
        if isinstance(value, str) and value not in names:
            raise ConfigError(f"{name} must be one of {', '.join(names)}, got {value!r}")
    base = {key.replace("-", "_"): value for key, value in spec.base.items()}
    base.pop("out", None)
    config = recipe_config(base, source="the base settings").resolved()
    if config.strategy == "ddp":
        raise ConfigError("trainkit tune runs each trial as one process; for parallel trials use --workers K")
    monitor = base.get("monitor") or default_objective(config)
    base["monitor"] = monitor  # the trial's early stopping and best checkpoint follow the objective
    config = recipe_config(base, source="the base settings").resolved()
    dimensions = parse_space(spec.space, base)
    if spec.sampler == "grid":
        grid = grid_space(dimensions)
        points = 1
        for values in grid.values():
            points *= len(values)
        if spec.trials > points:
            raise ConfigError(f"--sampler grid has {points} combinations; use --trials {points} or fewer")
    folder = Path(spec.out)
    return dataclasses.replace(
        spec, base=base, monitor=monitor, direction="minimize" if config.monitor_mode == "min" else "maximize",
        storage=spec.storage or f"sqlite:///{(folder / 'study.db').resolve()}",
        study_name=spec.study_name or folder.resolve().name, dimensions=dimensions,
    )  # fmt: skip


def default_objective(config: Any) -> str:
    """The task's own validation metric (accuracy, F1, the loss for regression and language models)."""
    from trainkit.recipes.components import build_run_task

    task = build_run_task(config)
    name = f"val_{task.objective}"
    return name if name in task.monitorable() else "val_loss"


def record_study(spec: TuneSpec, study: Any) -> None:
    """Check that this command continues the study that its folder (tune.json) and the storage
    describe, then record it in both. Refusals come first, so a refused command writes nothing."""
    has_folder_record = check_folder_record(spec)
    if STUDY_ATTR in study.user_attrs:
        check_study_owner(spec, study)
    else:
        adopt_study(spec, study, has_folder_record)
    if not has_folder_record:
        write_atomically(spec.folder / STUDY_FILE, json.dumps(spec.recorded(), indent=2) + "\n")


def check_folder_record(spec: TuneSpec) -> bool:
    """Whether the folder holds tune.json; refuses a command whose settings differ from it."""
    path = spec.folder / STUDY_FILE
    if not path.is_file():
        return False
    details = settings_differences(read_json(path, "the study's settings"), spec.recorded(), STUDY_KEYS)
    if details:
        raise ConfigError(f"{spec.folder} holds a study started with other settings ({details}); repeat its "
                          f"--config/--space/flags to continue it, or choose another --out")  # fmt: skip
    return True


def check_study_owner(spec: TuneSpec, study: Any) -> None:
    """Refuse a study that the storage says belongs to another folder (its trials' checkpoints and
    locks live there: B-5) or was started with other settings (its values came from those)."""
    record = study.user_attrs.get(STUDY_ATTR) or {}
    owner = record.get("folder")
    if owner != spec.home:
        raise ConfigError(f"{spec.where()} belongs to the tuner in {owner} (its trials and checkpoints live there); "
                          f"run it with --out {owner}, or give this one another --study-name")  # fmt: skip
    details = settings_differences(record.get("settings") or {}, storage_record(spec), STORAGE_KEYS)
    if details:
        raise ConfigError(f"{spec.where()} was started with other settings ({details}); repeat its "
                          f"--config/--space/flags to continue it, or give this one another --study-name")  # fmt: skip


def adopt_study(spec: TuneSpec, study: Any, has_folder_record: bool) -> None:
    """Record the folder and settings in a study without them: a new one, or one an older trainkit
    started, which only a folder whose tune.json agrees (checked before) may take over."""
    count = len(study.get_trials(deepcopy=False))
    if count and not has_folder_record:
        raise ConfigError(f"{spec.where()} holds {count} trial{'s' if count != 1 else ''} that no tune.json in "
                          f"{spec.folder} describes (an older trainkit or another program started it); run it with "
                          f"the --out that started it, or give this one another --study-name")  # fmt: skip
    record_in_storage(spec, study)
    check_study_owner(spec, study)  # two folders adopting one new study at once: the record that stayed wins


def record_in_storage(spec: TuneSpec, study: Any) -> None:
    """One attribute, written in one transaction: a crash leaves the whole record or none."""
    study.set_user_attr(STUDY_ATTR, {"folder": spec.home, "settings": storage_record(spec)})


def storage_record(spec: TuneSpec) -> dict[str, Any]:
    recorded = spec.recorded()
    return {key: recorded[key] for key in STORAGE_KEYS}


def settings_differences(saved: dict[str, Any], now: dict[str, Any], keys: tuple[str, ...]) -> str:
    """The recorded settings that this command changes, for a one-line refusal ('' when none)."""
    return "; ".join(describe_difference(key, saved.get(key), now.get(key)) for key in keys
                     if saved.get(key) != now.get(key))  # fmt: skip


def describe_difference(key: str, saved: Any, now: Any) -> str:
    if isinstance(saved, dict) and isinstance(now, dict):  # the base settings, or the space's tables
        return f"{key}: " + ", ".join(config_differences(saved, now))
    return f"{key} {saved!r} -> {now!r}"


def open_study(spec: TuneSpec) -> Any:
    """The Optuna study (created on first use), with a sampler and pruner built from the spec."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # trainkit logs each trial itself
    try:  # the storage too: RDBStorage reads the database's schema as it is built (C8)
        return optuna.create_study(storage=build_storage(spec.storage), study_name=spec.study_name,
                                   direction=spec.direction, sampler=build_sampler(spec, 0), pruner=build_pruner(spec),
                                   load_if_exists=True)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - Optuna's and SQLAlchemy's: a bad URL, a missing driver, no server
        raise ConfigError(f"cannot open the study storage {spec.storage}: {first_line(exc)}; {storage_advice(exc)}") from None


def build_storage(url: str) -> Any:
    """Workers writing to one SQLite file wait for each other's write lock; other URLs go to Optuna as given."""
    import optuna

    if not url.startswith("sqlite:"):
        return url
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}})


def storage_advice(exc: Exception) -> str:
    """The fix for a storage that would not open: a SQLite file that is not (or no longer) a database
    ("malformed", "not a database": sqlite3's plain DatabaseError) needs restoring; else the URL is wrong."""
    import sqlite3

    if type(getattr(exc, "orig", None)) is sqlite3.DatabaseError:
        return "the file is damaged: restore it from a backup, or move it away to start a new study"
    return "check --storage"


def build_sampler(spec: TuneSpec, trials_so_far: int) -> Any:
    """A fresh sampler for each new trial, seeded by (seed, trials so far): a restarted study
    samples what the uninterrupted one would have, instead of replaying its first trials."""
    import optuna

    if not isinstance(spec.sampler, str):
        return spec.sampler
    if spec.sampler == "grid":  # trial N takes point N of the grid shuffled by the seed: one seed for all
        return optuna.samplers.GridSampler(grid_space(spec.dimensions), seed=spec.sampler_seed)
    seed = spec.sampler_seed + trials_so_far
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def build_pruner(spec: TuneSpec) -> Any:
    import optuna

    if not isinstance(spec.pruner, str):
        return spec.pruner
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner()
    if spec.pruner == "hyperband":
        epochs = spec.base.get("epochs")
        budget = epochs if isinstance(epochs, int) and not spec.base.get("val_every_steps") else "auto"
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=budget)
    return optuna.pruners.NopPruner()


def trial_folder(spec: TuneSpec, number: int) -> Path:
    return spec.folder / "trials" / f"{number:04d}"


@dataclass
class Claim:
    """A trial this worker now owns: its Optuna handle, what it already reported, its folder (locked)."""

    trial: Any
    number: int
    params: dict[str, Any]
    folder: Path
    reported_steps: set[int]
    pruned_at: int | None
    resumed: bool


def claim_trial(spec: TuneSpec, study: Any) -> Claim | None:
    """A trial to work on: an orphan (RUNNING, its owner provably gone) first, else a new one while
    the study has fewer than ``spec.trials``; None when there is nothing left to do."""
    import optuna

    with waiting_for_lock(spec.folder / CLAIM_LOCK):
        check_study_owner(spec, study)  # still this folder's study, with these settings
        trials = study.get_trials(deepcopy=False)
        for frozen in trials:
            if frozen.state == optuna.trial.TrialState.RUNNING and owner_is_gone(spec, frozen):
                handle = optuna.trial.Trial(study, frozen._trial_id)  # noqa: SLF001 - Optuna's own way to reopen a trial
                return take(spec, handle, frozen.number, frozen.params, frozen)
        if len(trials) >= spec.trials:
            return None
        study.sampler = build_sampler(spec, len(trials))
        trial = study.ask({dimension.name: dimension.distribution() for dimension in spec.dimensions})
        trial.set_user_attr("run_dir", str(trial_folder(spec, trial.number).relative_to(spec.folder)))
        return take(spec, trial, trial.number, trial.params)


def owner_is_gone(spec: TuneSpec, frozen: Any) -> bool:
    """Whether a RUNNING trial's trainer is provably gone, so that this worker may resume it. Only a
    trial of this folder (its checkpoints are here), and only when its process died on this host, or
    its folder here is unlocked (the OS drops a dead holder's lock). A trial of another folder is
    never judged by a lock here, which its owner does not hold. Before owners were recorded, every
    trial was its folder's (an adopted study's folder is the one whose tune.json agrees)."""
    owner = frozen.user_attrs.get(OWNER_ATTR) or {"folder": spec.home}
    if owner.get("folder") != spec.home:
        return False
    pid = owner.get("pid")
    if owner.get("host") == socket.gethostname() and isinstance(pid, int) and not process_is_alive(pid):
        return True
    return not is_locked(trial_folder(spec, frozen.number))


def process_is_alive(pid: int) -> bool:
    """This process (it may own a trial it left RUNNING after an error), or another live one."""
    return pid == os.getpid() or _is_other_live_process(pid)


def trial_owner(spec: TuneSpec) -> dict[str, Any]:
    """Who trains a trial, recorded in it: what another worker or command checks before resuming it."""
    return {"folder": spec.home, "host": socket.gethostname(), "pid": os.getpid()}


def take(spec: TuneSpec, trial: Any, number: int, params: dict[str, Any], frozen: Any = None) -> Claim:
    """Lock the trial's folder and record this process as its owner before the claim lock is
    released, so no other worker sees it orphaned. ``frozen``: an orphan's record (what it reported
    and decided before it died)."""
    folder = trial_folder(spec, number)
    lock_run_folder(folder)
    trial.set_user_attr(OWNER_ATTR, trial_owner(spec))
    return Claim(trial=trial, number=number, params=dict(params), folder=folder,
                 reported_steps=set(frozen.intermediate_values) if frozen else set(),
                 pruned_at=frozen.user_attrs.get("pruned_at") if frozen else None, resumed=frozen is not None)  # fmt: skip


def default_threads(workers: int) -> int | None:
    """Each of K workers gets an equal share of the cores (None: one worker, torch's default)."""
    return None if workers == 1 else max(1, (os.cpu_count() or 1) // workers)
