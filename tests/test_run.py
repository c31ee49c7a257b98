"""The train job end to end through the Python API, on the synthetic dataset."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from trainkit.callbacks import Callback
from trainkit.checkpoint import load_checkpoint, model_sha256
from trainkit.errors import ConfigError
from trainkit.run import resume_config, train_run


def test_run_writes_every_artifact_and_learns(synthetic_config, tmp_path):
    summary = train_run(synthetic_config())
    out = tmp_path / "run"
    for name in ("config.json", "history.csv", "summary.json", "loss.png", "accuracy.png", "lr.png",
                 "checkpoints/best.pt", "checkpoints/epoch-0003.pt"):  # fmt: skip
        assert (out / name).is_file(), name
    assert summary["test_accuracy"] > 0.9
    assert json.loads((out / "summary.json").read_text()) == summary
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(float(r["epoch"])) for r in rows] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["epochs"] == 3


def test_same_seed_same_weights_different_seed_different(synthetic_config, tmp_path):
    a = train_run(synthetic_config(out=str(tmp_path / "a")))
    b = train_run(synthetic_config(out=str(tmp_path / "b")))
    c = train_run(synthetic_config(out=str(tmp_path / "c"), seed=1))
    assert a["model_sha256"] == b["model_sha256"]
    assert a["model_sha256"] != c["model_sha256"]


def test_early_stopping_leaves_the_best_validation_epochs_weights(synthetic_config, tmp_path):
    summary = train_run(synthetic_config(epochs=8, patience=1, min_delta=0.05, lr=3e-3))
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    history = best["history"]
    assert summary["stopped_early"] and summary["epochs_run"] < 8
    assert summary["best_epoch"] == best["epoch"]
    assert summary["model_sha256"] == model_sha256(best["model"])
    assert min(r["val_loss"] for r in history) == summary["best_val_metric"]


class CrashAtEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, state) -> None:
        if state.epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(synthetic_config, tmp_path):
    config = dict(epochs=4, dropout=0.3, augment_shift=1)
    full = train_run(synthetic_config(out=str(tmp_path / "full"), **config))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(synthetic_config(out=str(tmp_path / "crash"), **config), extra_callbacks=[CrashAtEpoch(3)])
    assert not (tmp_path / "crash" / "summary.json").exists()
    resumed = train_run(resume_config(tmp_path / "crash", {}), resume=True)
    assert resumed["model_sha256"] == full["model_sha256"]
    full_rows = list(csv.DictReader((tmp_path / "full" / "history.csv").open()))
    resumed_rows = list(csv.DictReader((tmp_path / "crash" / "history.csv").open()))
    keys = ("train_loss", "val_loss", "val_accuracy", "lr", "grad_norm")
    assert [[r[k] for k in keys] for r in resumed_rows] == [[r[k] for k in keys] for r in full_rows]


def test_an_existing_run_is_never_overwritten(synthetic_config):
    train_run(synthetic_config(epochs=1))
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        train_run(synthetic_config(epochs=1))


def test_resume_refuses_changed_settings(synthetic_config, tmp_path):
    train_run(synthetic_config(epochs=1))
    with pytest.raises(ConfigError, match="--lr"):
        resume_config(tmp_path / "run", {"lr": 0.5})
    assert resume_config(tmp_path / "run", {"device": "cpu"}).epochs == 1


def test_resume_of_a_missing_run_is_a_clear_error(synthetic_config, tmp_path):
    with pytest.raises(ConfigError, match="holds no trainkit run"):
        train_run(synthetic_config(), resume=True)


def test_resume_refuses_a_finished_run(synthetic_config):
    train_run(synthetic_config(epochs=1))
    with pytest.raises(ConfigError, match="already finished"):
        train_run(synthetic_config(epochs=1), resume=True)
