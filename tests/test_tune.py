"""`trainkit tune`: Optuna studies whose trials are trainkit runs, resumable after SIGKILL/SIGTERM,
with pruning, parallel workers, results that reproduce the best trial, and one-line errors for a
bad space before any trial runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from trainkit.config import config_from_dict, load_config_file, recipe_config  # noqa: E402
from trainkit.errors import ConfigError, TrainkitError  # noqa: E402
from trainkit.run import train_run  # noqa: E402
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


def tune_command(folder: Path, space: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainkit", "tune", *BASE_FLAGS, "--space", str(space), "--out",
                           str(folder), *extra], capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=300)  # fmt: skip


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


def test_without_optuna_tune_says_how_to_install_it(monkeypatch, capsys):
    from trainkit.cli import main

    monkeypatch.setitem(sys.modules, "optuna", None)
    assert main(["tune", "--space", "s.toml", "--trials", "1", "--out", "x"]) == 2
    assert capsys.readouterr().err.strip() == "trainkit tune: error: trainkit tune needs Optuna: pip install 'trainkit[tune]'"


def test_a_config_file_turns_clipping_off_with_zero_as_the_flag_does(tmp_path):
    assert recipe_config({"clip_norm": 0}).clip_norm is None
    assert recipe_config({"clip_norm": 0.5}).clip_norm == 0.5


def test_workers_of_a_killed_tuner_checkpoint_their_trials_and_stop(tmp_path):
    from trainkit.rundir import is_locked

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
