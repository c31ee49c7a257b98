"""`trainkit tune`: Optuna studies whose trials are trainkit runs, resumable after SIGKILL/SIGTERM,
with pruning, parallel workers, results that reproduce the best trial, and one-line errors for a
bad space before any trial runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from trainkit.config.files import config_from_dict, load_config_file, recipe_config  # noqa: E402
from trainkit.errors import ConfigError, TrainkitError  # noqa: E402
from trainkit.recipes.run import train_run  # noqa: E402
from trainkit.tune import tune  # noqa: E402
from trainkit.tune.space import parse_space  # noqa: E402

BASE = {"dataset": "synthetic", "epochs": 3, "batch_size": 64, "device": "cpu"}  # 50 steps an epoch
BASE_FLAGS = ["--dataset", "synthetic", "--epochs", "3", "--batch-size", "64", "--device", "cpu"]
SPACE = textwrap.dedent("""
    [lr]
    low = 1e-3
    high = 1e-2
    log = true

    [dropout]
    low = 0.0
    high = 0.5
""")


def study_of(folder: Path):
    return optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder / 'study.db'}")


def tune_argv(folder: Path, space: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainkit", "tune", *BASE_FLAGS, "--space", str(space), "--out", str(folder), *extra]


def tune_command(folder: Path, space: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(tune_argv(folder, space, *extra), capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)  # fmt: skip


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_a_killed_study_resumes_its_running_trial_from_its_checkpoint(tmp_path):
    """SIGKILL in trial 1's second epoch; the same command again: 4 trials, numbers once each, trial 1
    resumed from its epoch-1 checkpoint to the weights of the same trial run without interruption,
    and best.toml trains the best trial again to its model_sha256."""
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    folder = tmp_path / "study"
    options = ("--trials", "4", "--pruner", "none", "--sampler-seed", "3")
    killed = tune_command(folder, space, *options, env={"TRAINKIT_KILL_AT": "step:230"})  # trial 1, step 80 of 150
    assert killed.returncode == -9, killed.stderr
    assert [t.state.name for t in study_of(folder).get_trials()] == ["COMPLETE", "RUNNING"]
    again = tune_command(folder, space, *options)
    assert again.returncode == 0, again.stderr
    assert f"resuming from {folder / 'trials' / '0001' / 'checkpoints' / 'epoch-0001.pt'}" in again.stderr

    trials = study_of(folder).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert sorted(p.name for p in (folder / "trials").iterdir()) == ["0000", "0001", "0002", "0003"]
    record = json.loads((folder / "trials" / "0001" / "trial.json").read_text())
    assert record["resumed"] and record["state"] == "complete" and record["params"] == trials[1].params
    history = (folder / "trials" / "0001" / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2", "3"]  # every epoch once

    saved = json.loads((folder / "trials" / "0001" / "config.json").read_text())
    uninterrupted = train_run(config_from_dict({**saved, "out": str(tmp_path / "uninterrupted")}))
    assert uninterrupted["model_sha256"] == summary_of(folder / "trials" / "0001")["model_sha256"]

    best = max(trials, key=lambda t: t.value)
    outcome = json.loads(again.stdout)
    assert outcome["best_trial"] == best.number and outcome["trials"]["complete"] == 4
    again_best = train_run(recipe_config({**load_config_file(folder / "best.toml"), "out": str(tmp_path / "best")}))
    assert again_best["model_sha256"] == summary_of(folder / "trials" / f"{best.number:04d}")["model_sha256"]


def test_sigterm_checkpoints_the_trial_records_it_and_exits_75(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    folder = tmp_path / "study"
    stopped = tune_command(folder, space, "--trials", "2", env={"TRAINKIT_KILL_AT": "step:80",
                                                                 "TRAINKIT_KILL_SIGNAL": "TERM"})  # fmt: skip
    assert stopped.returncode == 75
    last = stopped.stderr.strip().splitlines()[-1]
    assert "trial 0: received SIGTERM" in last and "run the same `trainkit tune` command again" in last
    (trial,) = study_of(folder).get_trials()
    assert trial.state.name == "RUNNING" and "received SIGTERM" in trial.user_attrs["interrupted"]
    assert json.loads((folder / "trials" / "0000" / "trial.json").read_text())["state"] == "interrupted"
    assert (folder / "trials" / "0000" / "checkpoints" / "epoch-0002-step-00000080.pt").is_file()
    finished = tune_command(folder, space, "--trials", "2")
    assert finished.returncode == 0, finished.stderr
    assert [t.state.name for t in study_of(folder).get_trials()] == ["COMPLETE", "COMPLETE"]


def test_pruning_stops_a_trial_at_the_validation_it_fails_and_records_it(tmp_path):
    """Optuna's ThresholdPruner on val_accuracy (the default objective): the lr 1e-6 trial is stopped
    after its first epoch; the study, trial.json and the run folder all say so."""
    folder = tmp_path / "study"
    outcome = tune({**BASE, "patience": 0}, {"lr": {"choices": [1e-6, 3e-3]}}, trials=2, out=folder, sampler="grid",
                   pruner=optuna.pruners.ThresholdPruner(lower=0.5))  # fmt: skip
    trials = {t.params["lr"]: t for t in study_of(folder).get_trials()}
    slow, good = trials[1e-6], trials[3e-3]
    assert slow.state.name == "PRUNED" and slow.user_attrs["pruned_at"] == 1 and list(slow.intermediate_values) == [1]
    assert good.state.name == "COMPLETE" and list(good.intermediate_values) == [1, 2, 3]
    slow_run = folder / "trials" / f"{slow.number:04d}"
    record = json.loads((slow_run / "trial.json").read_text())
    assert record["state"] == "pruned" and record["pruned_at"] == 1
    assert summary_of(slow_run)["epochs_run"] == 1 and summary_of(slow_run)["stopped_early"]
    assert slow.intermediate_values[1] == pytest.approx(json.loads((slow_run / "summary.json").read_text())["best_val_metric"])
    assert outcome["trials"] == {"complete": 1, "pruned": 1, "fail": 0, "running": 0}
    assert outcome["monitor"] == "val_accuracy" and outcome["best_trial"] == good.number


def test_with_val_every_steps_the_pruner_sees_each_validation_by_its_optimizer_step(tmp_path):
    outcome = tune({**BASE, "epochs": 1, "val_every_steps": 20}, {"lr": {"choices": [3e-3]}}, trials=1,
                   out=tmp_path / "study", pruner="hyperband")  # fmt: skip
    (trial,) = study_of(tmp_path / "study").get_trials()
    assert list(trial.intermediate_values) == [20, 40, 50]  # two mid-epoch points and the epoch's end
    assert outcome["trials"]["complete"] == 1


def test_two_workers_share_one_study_without_taking_a_trial_twice(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    folder = tmp_path / "study"
    result = tune_command(folder, space, "--trials", "4", "--workers", "2")
    assert result.returncode == 0, result.stderr
    trials = study_of(folder).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3] and all(t.state.name == "COMPLETE" for t in trials)
    assert any(line.startswith(("[worker 0] trial", "[worker 1] trial")) for line in result.stderr.splitlines())
    for trial in trials:  # each worker trained with its share of the cores
        config = json.loads((folder / "trials" / f"{trial.number:04d}" / "config.json").read_text())
        assert config["threads"] == max(1, (os.cpu_count() or 1) // 2)
    table = (folder / "trials.csv").read_text().splitlines()
    assert table[0].startswith("trial,state,val_accuracy,lr,dropout") and len(table) == 5
    report = (folder / "report.md").read_text()
    assert report.count(" | complete | ") == 4 and "![parameter importances](param_importances.png)" in report
    for plot in ("optimization_history", "intermediate_values", "param_importances", "parallel_coordinate"):
        assert (folder / f"{plot}.png").stat().st_size > 5000
    assert "data:image/png;base64" in (folder / "report.html").read_text()


FACTORIES = textwrap.dedent("""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset


    def blobs(n=400):
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, 4, generator=g) + y[:, None] * 2.0
        return TensorDataset(x[:300], y[:300]), TensorDataset(x[300:], y[300:])


    class Scaled(nn.Sequential):
        def __init__(self, width, gain):
            super().__init__(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))
            self.gain = gain

        def forward(self, x):
            return super().forward(x) * self.gain


    def model(width=8, gain=1.0):
        return Scaled(width, gain)
""")


def test_a_diverging_trial_fails_and_the_study_goes_on_with_a_factory_argument_space(tmp_path, monkeypatch):
    (tmp_path / "tune_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = {"dataset": "tune_factories:blobs", "model": "tune_factories:model", "epochs": 2, "batch_size": 50,
            "device": "cpu"}  # fmt: skip
    space = {"model_args": {"gain": {"choices": [1.0, float("inf")]}, "width": {"low": 4, "high": 8, "step": 4}}}
    outcome = tune(base, space, trials=4, out=tmp_path / "study", sampler="grid", pruner="none")
    trials = study_of(tmp_path / "study").get_trials()
    assert all((t.state.name == "FAIL") == (t.params["model_args.gain"] == float("inf")) for t in trials)
    assert all("NaN/inf" in t.user_attrs["error"] for t in trials if t.state.name == "FAIL")
    assert sorted((t.params["model_args.width"], t.params["model_args.gain"]) for t in trials) == [(4, 1.0), (4, float("inf")), (8, 1.0),
                                                                             (8, float("inf"))]  # fmt: skip
    config = json.loads((tmp_path / "study" / "trials" / "0000" / "config.json").read_text())
    assert config["model_args"] == {"gain": trials[0].params["model_args.gain"], "width": trials[0].params["model_args.width"]}
    assert outcome["trials"] == {"complete": 2, "pruned": 0, "fail": 2, "running": 0}


def test_an_error_stops_the_tuner_in_one_line_and_its_trial_resumes_once_fixed(tmp_path):
    base = {"dataset": "mnist", "train_size": 2000, "val_size": 500, "epochs": 1, "device": "cpu"}
    space = {"lr": {"low": 1e-3, "high": 1e-2}}
    with pytest.raises(TrainkitError, match=r"^trial 0 \(lr=0\.\d+\): .*nowhere") as raised:
        tune({**base, "data_dir": str(tmp_path / "nowhere")}, space, trials=1, out=tmp_path / "study")
    assert "\n" not in str(raised.value)
    assert [t.state.name for t in study_of(tmp_path / "study").get_trials()] == ["RUNNING"]
    outcome = tune(base, space, trials=1, out=tmp_path / "study")  # the data found ($TRAINKIT_DATA_DIR)
    assert outcome["trials"]["complete"] == 1 and [t.number for t in study_of(tmp_path / "study").get_trials()] == [0]


def test_a_study_continues_only_with_its_own_settings_and_may_grow(tmp_path):
    folder = tmp_path / "study"
    space = {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}
    tune({**BASE, "epochs": 1}, space, trials=1, out=folder)
    with pytest.raises(ConfigError, match=r"holds a study started with other settings \(space: lr"):
        tune({**BASE, "epochs": 1}, {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}, trials=1, out=folder)
    with pytest.raises(ConfigError, match=r"other settings \(base: epochs: 1 -> 2\)"):
        tune({**BASE, "epochs": 2}, space, trials=1, out=folder)
    outcome = tune({**BASE, "epochs": 1}, space, trials=2, out=folder)  # a bigger budget continues it
    assert outcome["trials"]["complete"] == 2 and [t.number for t in study_of(folder).get_trials()] == [0, 1]


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({}, "names no setting to tune"),
        ({"learning_rate": {"low": 0.1, "high": 1}}, r"\[learning_rate\] is not a trainkit setting"),
        ({"lr": {"low": 0.1, "high": 0.01}}, r"\[lr\]: low 0.1 must be below high 0.01"),
        ({"lr": {"low": 0, "high": 0.1, "log": True}}, "a log range needs low > 0"),
        ({"lr": {"low": 1e-3, "high": 0.1, "log": True, "step": 0.01}}, "either log or stepped"),
        ({"lr": {"low": 1e-3}}, "needs both low and high"),
        ({"lr": {"min": 1e-3, "max": 0.1}}, "unknown key"),
        ({"lr": 0.1}, r"\[lr\] must be a table"),
        ({"lr": {"low": "small", "high": 0.1}}, "low must be a finite number"),
        ({"lr": {"choices": []}}, "choices must be a non-empty list"),
        ({"lr": {"choices": [0.1], "low": 0.1}}, "choices or low/high, not both"),
        ({"batch_size": {"low": 16.5, "high": 64}}, "--batch-size is an integer setting"),
        ({"norm": {"low": 1, "high": 2}}, "--norm is not a number; list its values as choices"),
        ({"dropout": {"low": 0.0, "high": 1.0}}, r"\[dropout\] 1.0 cannot run with the base settings: --dropout must be in \[0, 1\)"),
        ({"optimizer": {"choices": ["adamw", "lion"]}}, r"\[optimizer\] 'lion' cannot run"),
        ({"out": {"choices": ["a", "b"]}}, "says where or how trials run"),
        ({"model_args": {"width": {"low": 8, "high": 16}}}, r"MODULE:FUNCTION model; --model mlp has none"),
    ],
)
def test_a_bad_space_is_one_line_before_any_trial(tmp_path, space, message):
    with pytest.raises(ConfigError, match=message) as raised:
        tune(BASE, space, trials=2, out=tmp_path / "study")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "study" / "study.db").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"trials": 0}, "--trials must be an integer >= 1"),
        ({"sampler": "grid"}, r"--sampler grid needs choices or a step for every setting; \[lr\] is a continuous range"),
        ({"sampler": "annealing"}, "--sampler must be one of tpe, random, grid"),
        ({"workers": 0}, "--workers must be an integer in 1.."),
        ({"sampler_seed": -1}, "--sampler-seed must be an integer in 0.."),
        ({"base": {**BASE, "monitor": "val_f1"}}, "--monitor 'val_f1' is not a metric of the run"),
        ({"base": {**BASE, "strategy": "ddp"}}, "runs each trial as one process"),
        ({"base": {**BASE, "lr": -1.0}}, "--lr must be a positive finite number"),
        ({"base": ["dataset", "mnist"]}, "takes a mapping of settings or a TrainConfig"),
        ({"storage": "nosuchdb://nowhere"}, "cannot open the study storage nosuchdb://nowhere"),
    ],
)
def test_bad_study_options_are_one_line_before_any_trial(tmp_path, options, message):
    arguments = {"base": BASE, "trials": 2, **options}
    with pytest.raises(ConfigError, match=message):
        tune(arguments.pop("base"), {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}, out=tmp_path / "study", **arguments)
    assert not (tmp_path / "study" / "study.db").exists() and not (tmp_path / "study" / "tune.json").exists()


def test_a_train_config_is_a_base_too_and_a_tiny_study_trains_its_trial(tmp_path):
    from trainkit import TrainConfig

    outcome = tune(TrainConfig(**{**BASE, "epochs": 1}), {"dropout": {"choices": [0.1]}}, trials=1, out=tmp_path / "s")
    record = json.loads((tmp_path / "s" / "trials" / "0000" / "trial.json").read_text())
    assert record["settings"]["epochs"] == 1 and record["settings"]["dropout"] == 0.1 and "lr" not in record["settings"]
    assert outcome["best_trial"] == 0 and summary_of(tmp_path / "s" / "trials" / "0000")["epochs_run"] == 1


def test_a_grid_holds_only_so_many_trials(tmp_path):
    with pytest.raises(ConfigError, match="--sampler grid has 6 combinations; use --trials 6 or fewer"):
        tune(BASE, {"lr": {"choices": [1e-3, 1e-2]}, "epochs": {"low": 1, "high": 3}}, trials=7, out=tmp_path, sampler="grid")


def test_space_tables_become_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dimensions = parse_space({"lr": {"low": 1e-4, "high": 0.1, "log": True}, "weight_decay": {"low": 0, "high": 1},
                              "epochs": {"low": 2, "high": 8, "step": 2}, "hidden": {"choices": [[512, 256], [128]]}},
                             BASE)  # fmt: skip
    lr, decay, epochs, hidden = (dimension.distribution() for dimension in dimensions)
    assert isinstance(lr, FloatDistribution) and lr.log and (lr.low, lr.high) == (1e-4, 0.1)
    assert isinstance(decay, FloatDistribution) and not decay.log  # a float setting, though its bounds are ints
    assert isinstance(epochs, IntDistribution) and epochs.step == 2 and dimensions[2].grid() == [2, 4, 6, 8]
    assert isinstance(hidden, CategoricalDistribution) and hidden.choices == ("[512, 256]", "[128]")
    assert dimensions[3].value("[512, 256]") == [512, 256]  # a list choice comes back as the list


@pytest.mark.parametrize("missing", ["optuna", "tomli_w"])
def test_without_a_module_of_the_tune_extra_tune_names_it_and_the_extra(monkeypatch, capsys, missing):
    """Either of the extra's modules missing: the line names that module, not always Optuna."""
    from trainkit.cli import main

    monkeypatch.setitem(sys.modules, missing, None)
    assert main(["tune", "--space", "s.toml", "--trials", "1", "--out", "x"]) == 2
    assert capsys.readouterr().err.strip() == (f"trainkit tune: error: trainkit tune needs the Python module {missing} "
                                               f"(not installed): pip install 'trainkit[tune]'")  # fmt: skip


def test_a_config_file_turns_clipping_off_with_zero_as_the_flag_does(tmp_path):
    assert recipe_config({"clip_norm": 0}).clip_norm is None
    assert recipe_config({"clip_norm": 0.5}).clip_norm == 0.5


def test_workers_of_a_killed_tuner_checkpoint_their_trials_and_stop(tmp_path):
    from trainkit.checkpoint.rundir import is_locked

    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    folder = tmp_path / "study"
    # trials long enough for both workers to be inside one when the tuner dies: 300 epochs, no early stopping
    command = [sys.executable, "-m", "trainkit", "tune", *BASE_FLAGS, "--epochs", "300", "--patience", "0",
               "--space", str(space), "--trials", "2", "--workers", "2", "--out", str(folder)]  # fmt: skip
    tuner = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    runs = [folder / "trials" / name for name in ("0000", "0001")]
    # any epoch's checkpoint: retention deletes epoch 1's once epoch 4's is written
    wait_for(lambda: all(any((run / "checkpoints").glob("epoch-*.pt")) for run in runs), tuner)
    tuner.kill()
    tuner.wait()
    records = lambda: [json.loads((run / "trial.json").read_text()) for run in runs]  # noqa: E731
    wait_for(lambda: all(r["state"] == "interrupted" for r in records()) and not any(map(is_locked, runs)))
    assert all("received SIGTERM" in record["error"] for record in records())
    assert [t.state.name for t in study_of(folder).get_trials()] == ["RUNNING", "RUNNING"]  # resumable


def wait_for(condition, process: subprocess.Popen | None = None, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the tuner ended early: {process.stderr.read()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_damaged_study_db_is_one_line_naming_the_storage_and_the_fix(tmp_path, capsys):
    """C8: a study.db truncated to 5 kB is refused in one line, not a sqlalchemy traceback."""
    from trainkit.cli import main

    folder = tmp_path / "study"
    folder.mkdir()
    storage = f"sqlite:///{(folder / 'study.db').resolve()}"
    optuna.create_study(storage=storage, study_name="study").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    os.truncate(folder / "study.db", 5000)
    (tmp_path / "space.toml").write_text(SPACE)
    assert main(["tune", *BASE_FLAGS, "--space", str(tmp_path / "space.toml"), "--trials", "1", "--out", str(folder)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"trainkit tune: error: cannot open the study storage {storage}: (sqlite3.DatabaseError) ")
    assert error.endswith("; the file is damaged: restore it from a backup, or move it away to start a new study")
    assert "\n" not in error and not (folder / "tune.json").exists()


def study_owner(trial) -> dict:
    return trial.user_attrs["owner"]


def is_stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP): state T in /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def test_a_tuner_from_another_folder_is_refused_and_the_owners_trials_are_untouched(tmp_path):
    """B-5 (C9): A freezes inside trial 0; B, on the same storage and study from another --out with
    other base settings, is refused in one line before it touches a trial; A, continued, finishes
    both trials with its own settings."""
    import signal

    from trainkit.checkpoint.rundir import is_locked

    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    shared = ("--storage", f"sqlite:///{tmp_path / 'shared.db'}", "--study-name", "s", "--trials", "2", "--patience", "0",
              "--hidden", "8")  # fmt: skip
    folder_a, folder_b = tmp_path / "tuneA", tmp_path / "tuneB"
    stopped = {**os.environ, "TRAINKIT_KILL_AT": "step:5", "TRAINKIT_KILL_SIGNAL": "STOP"}
    tuner_a = subprocess.Popen(tune_argv(folder_a, space, *shared, "--epochs", "2"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=stopped)  # fmt: skip
    try:
        wait_for(lambda: is_stopped(tuner_a.pid), tuner_a)
        assert is_locked(folder_a / "trials" / "0000")
        tuner_b = tune_command(folder_b, space, *shared, "--epochs", "1")
        assert tuner_b.returncode == 2, tuner_b.stderr
        assert tuner_b.stderr.strip() == (
            f"trainkit tune: error: study 's' in sqlite:///{tmp_path / 'shared.db'} belongs to the tuner in "
            f"{folder_a.resolve()} (its trials and checkpoints live there); run it with --out {folder_a.resolve()}, "
            f"or give this one another --study-name")  # fmt: skip
        (trial,) = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'shared.db'}").get_trials()
        assert trial.state.name == "RUNNING" and study_owner(trial)["pid"] == tuner_a.pid
        assert study_owner(trial)["folder"] == str(folder_a.resolve())
        assert not (folder_b / "trials").exists() and not (folder_b / "tune.json").exists()
    finally:
        tuner_a.send_signal(signal.SIGCONT)
        _, errors = tuner_a.communicate(timeout=300)
    assert tuner_a.returncode == 0, errors
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'shared.db'}").get_trials()
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    for trial in trials:  # trained by A, with A's two epochs
        assert summary_of(folder_a / "trials" / f"{trial.number:04d}")["epochs_run"] == 2
        assert trial.value == summary_of(folder_a / "trials" / f"{trial.number:04d}")["best_val_metric"]


def test_the_same_settings_from_another_folder_are_refused_too(tmp_path):
    """In-process, one after the other: the study's folder is recorded in the storage, so another
    --out is refused even with identical settings, and the study keeps its one trial."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    space = {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}
    tune({**BASE, "epochs": 1}, space, trials=1, out=tmp_path / "a", storage=storage, study_name="s")
    before = optuna.load_study(study_name="s", storage=storage).get_trials()
    owner = re.escape(str((tmp_path / "a").resolve()))
    with pytest.raises(ConfigError, match=rf"^study 's' in {re.escape(storage)} belongs to the tuner in {owner} "):
        tune({**BASE, "epochs": 1}, space, trials=2, out=tmp_path / "b", storage=storage, study_name="s")
    after = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert [(t.number, t.state.name, t.value, t.datetime_complete) for t in after] == [
        (t.number, t.state.name, t.value, t.datetime_complete) for t in before]  # fmt: skip
    assert len(after) == 1 and not (tmp_path / "b" / "trials").exists()


def test_the_storage_refuses_other_settings_when_the_folder_lost_its_record(tmp_path):
    """The study's settings live in the storage: deleting tune.json does not let other settings in."""
    folder = tmp_path / "study"
    space = {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}
    tune({**BASE, "epochs": 1}, space, trials=1, out=folder)
    (folder / "tune.json").unlink()
    with pytest.raises(ConfigError, match=r"^study 'study' in sqlite:///.* was started with other settings "
                                          r"\(base: epochs: 1 -> 2\); repeat its --config/--space/flags"):  # fmt: skip
        tune({**BASE, "epochs": 2}, space, trials=2, out=folder)
    assert len(study_of(folder).get_trials()) == 1 and not (folder / "tune.json").exists()


def test_a_study_an_older_trainkit_started_is_adopted_by_its_own_folder_only(tmp_path, monkeypatch):
    """A study without the storage record (an older trainkit): another folder is refused; its own
    folder, whose tune.json agrees, records the study's settings and folder and continues it."""
    from trainkit.tune import study as study_module

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    space = {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}
    with monkeypatch.context() as older:
        older.setattr(study_module, "record_in_storage", lambda spec, study: None)
        older.setattr(study_module, "check_study_owner", lambda spec, study: None)
        tune({**BASE, "epochs": 1}, space, trials=1, out=tmp_path / "a", storage=storage, study_name="s")
    assert optuna.load_study(study_name="s", storage=storage).user_attrs == {}
    with pytest.raises(ConfigError, match=r"^study 's' in .* holds 1 trial that no tune.json in .*b describes"):
        tune({**BASE, "epochs": 1}, space, trials=2, out=tmp_path / "b", storage=storage, study_name="s")
    outcome = tune({**BASE, "epochs": 1}, space, trials=2, out=tmp_path / "a", storage=storage, study_name="s")
    study = optuna.load_study(study_name="s", storage=storage)
    assert study.user_attrs["trainkit_study"]["folder"] == str((tmp_path / "a").resolve())
    assert study.user_attrs["trainkit_study"]["settings"]["base"]["epochs"] == 1
    assert outcome["trials"]["complete"] == 2 and not (tmp_path / "b" / "trials").exists()


def test_a_running_trial_is_reclaimed_only_when_its_owner_is_provably_gone(tmp_path):
    """Claiming in folder F: a RUNNING trial of another folder, whose owner lives, is left alone
    (F's own trial folder for that number is unlocked); one of F whose process died on this host
    is resumed under its number and now names this process as its owner."""
    import socket

    from trainkit.tune.study import TuneSpec, claim_trial, open_study, prepare_spec, record_study

    folder = tmp_path / "study"
    folder.mkdir()
    spec = prepare_spec(TuneSpec(base={**BASE, "epochs": 1}, space={"lr": {"low": 1e-3, "high": 1e-2}}, trials=2,
                                 out=str(folder)))  # fmt: skip
    study = open_study(spec)
    record_study(spec, study)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owners = [{"folder": str(tmp_path / "elsewhere"), "host": socket.gethostname(), "pid": alive.pid},
                  {"folder": str(folder.resolve()), "host": socket.gethostname(), "pid": int(dead.stdout)}]  # fmt: skip
        for owner in owners:
            study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-2)}).set_user_attr("owner", owner)
        claim = claim_trial(spec, study)
        assert claim is not None and claim.number == 1 and claim.resumed
        assert claim_trial(spec, study) is None  # trial 0 is still its live owner's; the study is full
        trials = study.get_trials()
        assert study_owner(trials[0]) == owners[0]
        assert study_owner(trials[1]) == {"folder": str(folder.resolve()), "host": socket.gethostname(),
                                          "pid": os.getpid()}  # fmt: skip
    finally:
        alive.kill()
        alive.wait()
