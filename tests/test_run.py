"""The train job end to end through the Python API, on the synthetic dataset."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from crashes import CrashAtEpoch
from safetensors.torch import load_file

from trainkit.checkpoint.file import all_finite, model_sha256
from trainkit.checkpoint.store import load_checkpoint, verify_checkpoint
from trainkit.errors import CheckpointError, ConfigError, NonFiniteLossError, OutputError
from trainkit.recipes.resume import resume_config
from trainkit.recipes.run import train_run


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


def test_plots_off_writes_no_pngs_and_the_same_weights_and_may_change_on_resume(synthetic_config, tmp_path):
    plotted = train_run(synthetic_config(out=str(tmp_path / "plotted"), epochs=2))
    bare = train_run(synthetic_config(out=str(tmp_path / "bare"), epochs=2, plots=False))
    assert not list((tmp_path / "bare").glob("*.png")) and (tmp_path / "bare" / "summary.json").is_file()
    assert bare["model_sha256"] == plotted["model_sha256"]
    assert resume_config(tmp_path / "bare", {"plots": True}).plots is True  # not a different run


def test_a_runs_thread_count_does_not_leak_into_the_next_run_of_the_process(synthetic_config, tmp_path):
    """A run with --threads 1 left the process at one thread, so a later in-process run (a notebook;
    test_tune's uninterrupted reference) summed differently from a fresh process and got other weights."""
    before = torch.get_num_threads()
    train_run(synthetic_config(out=str(tmp_path / "one"), epochs=1, threads=1))
    assert torch.get_num_threads() == before


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


def test_resume_of_a_folder_without_a_run_starts_it_and_of_a_finished_run_changes_nothing(synthetic_config, caplog):
    caplog.set_level("INFO", logger="trainkit")
    first = train_run(synthetic_config(epochs=1), resume=True)
    assert "holds no run yet; starting it" in caplog.text and first["epochs_run"] == 1
    assert train_run(synthetic_config(epochs=1), resume=True) == json.loads(
        (Path(synthetic_config().out) / "summary.json").read_text())
    assert "already finished (summary.json); nothing to do" in caplog.text


def test_retention_across_a_run_and_best_is_the_best_validation_epoch(synthetic_config, tmp_path):
    summary = train_run(synthetic_config(epochs=5, patience=0, keep_checkpoints=2, keep_every_epochs=2,
                                         checkpoint_every_steps=20, lr=3e-3))  # fmt: skip
    folder = tmp_path / "run" / "checkpoints"
    # 50 steps/epoch: the newest two are epoch-0005-step-00000240 and epoch-0005.pt
    assert sorted(p.name for p in folder.iterdir()) == [
        "best.pt", "epoch-0002.pt", "epoch-0004.pt", "epoch-0005-step-00000240.pt", "epoch-0005.pt"
    ]  # fmt: skip
    history = load_checkpoint(folder / "epoch-0005.pt")["history"]
    best_epoch = min(history, key=lambda row: row["val_loss"])["epoch"]
    assert load_checkpoint(folder / "best.pt")["epoch"] == best_epoch == summary["best_epoch"]


def checkpoint_writes_fail_after(monkeypatch, successes: int, errno_: int = errno.ENOSPC) -> list[str]:
    """Every checkpoint write after the first ``successes`` fails like a full disk; returns the names tried."""
    from trainkit.checkpoint import store as ckpt  # where CheckpointDir saves from

    real, tried = ckpt.save_checkpoint, []

    def save(payload, path):
        tried.append(Path(path).name)
        if len(tried) > successes:
            raise OSError(errno_, os.strerror(errno_))
        return real(payload, path)

    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    return tried


def test_a_failing_save_is_reported_keeps_earlier_checkpoints_and_training_goes_on(
    synthetic_config, tmp_path, monkeypatch, caplog
):
    checkpoint_writes_fail_after(monkeypatch, successes=2)  # epoch-0001.pt and best.pt
    caplog.set_level(logging.INFO, logger="trainkit")
    summary = train_run(synthetic_config(epochs=3, patience=0))
    assert summary["epochs_run"] == 3
    assert "No space left on device" in caplog.text and "earlier checkpoints are intact" in caplog.text
    folder = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["best.pt", "epoch-0001.pt"]
    assert all(verify_checkpoint(p) is None for p in folder.iterdir())
    # the run says so at the end, in the summary and the last line, instead of looking clean
    assert summary["failed_saves"] == 2 and summary["best_checkpoint"] == "checkpoints/best.pt"
    assert "2 checkpoint save(s) failed" in caplog.records[-1].getMessage()


def test_a_failed_best_save_is_reported_as_such_and_best_safetensors_never_lies(
    synthetic_config, tmp_path, monkeypatch, caplog
):
    tried = checkpoint_writes_fail_after(monkeypatch, successes=3)  # epoch 1, best (epoch 1), epoch 2; best fails
    summary = train_run(synthetic_config(epochs=2, patience=0, lr=3e-3))
    assert tried[:4] == ["epoch-0001.pt", "best.pt", "epoch-0002.pt", "best.pt"], "epoch 2 must improve"
    assert "saved epoch-0002.pt but could not update best.pt" in caplog.text
    assert summary["best_epoch"] == 2 and summary["failed_saves"] == 1
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["epoch"] == 1  # the previous best stays
    # best.safetensors must hold epoch 2's weights: here the final ones (said in the summary)
    assert summary["best_weights"] == "the final weights (epoch 2, the best)"
    best = load_file(tmp_path / "run" / "best.safetensors")
    assert model_sha256(best) == model_sha256(load_checkpoint(tmp_path / "run" / "checkpoints" / "epoch-0002.pt")["model"])


def test_a_full_disk_at_export_is_one_error_and_resume_finishes_the_job(synthetic_config, tmp_path, monkeypatch):
    from trainkit.recipes import outputs as run_module

    real_export = run_module.export_safetensors

    def export_on_a_full_disk(state, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_module, "export_safetensors", export_on_a_full_disk)
    with pytest.raises(OutputError, match="model.safetensors: No space left on device.*--resume` finishes the export"):
        train_run(synthetic_config(epochs=2))
    assert not (tmp_path / "run" / "summary.json").exists()  # not a finished-looking run
    failure = json.loads((tmp_path / "run" / "failure.json").read_text())  # what `trainkit runs` shows
    assert failure["type"] == "OutputError" and "No space left on device" in failure["error"]
    monkeypatch.setattr(run_module, "export_safetensors", real_export)
    reference = train_run(synthetic_config(epochs=2, out=str(tmp_path / "reference")))
    resumed = train_run(synthetic_config(epochs=2), resume=True)
    assert resumed["model_sha256"] == reference["model_sha256"]
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "failure.json").exists()  # finished now


def test_skip_with_a_diverging_lr_stops_with_exit_3_and_exports_nothing(synthetic_config, tmp_path):
    """The review's H2: with --lr 1e6 every step is NaN; skip must not report success at chance accuracy."""
    with pytest.raises(NonFiniteLossError, match="--max-skipped-steps 5"):  # 10% of 50 steps
        train_run(synthetic_config(epochs=2, lr=1e6, on_nonfinite="skip", checkpoint_every_steps=10))
    out = tmp_path / "run"
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    for path in (out / "checkpoints").glob("*.pt"):
        assert all_finite(load_checkpoint(path)["model"]), path.name


def test_save_error_policy_stop(synthetic_config, monkeypatch):
    checkpoint_writes_fail_after(monkeypatch, successes=0, errno_=errno.EACCES)
    with pytest.raises(CheckpointError, match="Permission denied"):
        train_run(synthetic_config(epochs=2, on_save_error="stop"))


def crashed_run(synthetic_config, tmp_path):
    with pytest.raises(RuntimeError):
        train_run(synthetic_config(epochs=3), extra_callbacks=[CrashAtEpoch(2)])
    return tmp_path / "run"


def test_resume_refuses_a_checkpoint_with_different_settings_naming_them(synthetic_config, tmp_path):
    out = crashed_run(synthetic_config, tmp_path)
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "lr": 0.5, "dataset": "mnist"}))
    with pytest.raises(CheckpointError, match=r"dataset: 'synthetic' -> 'mnist'; lr: 0.001 -> 0.5.*--force-resume"):
        train_run(resume_config(out, {}), resume=True)


def test_force_resume_accepts_changed_settings_and_names_each_it_overrides(synthetic_config, tmp_path, caplog):
    out = crashed_run(synthetic_config, tmp_path)
    summary = train_run(resume_config(out, {"lr": 5e-4}, force=True), resume=True, force_resume=True)
    assert "--force-resume: continuing from" in caplog.text and "a setting differs (lr: 0.001 -> 0.0005)" in caplog.text
    assert summary["epochs_run"] == 3
    assert json.loads((out / "config.json").read_text())["lr"] == 5e-4


def test_safetensors_export_holds_the_final_and_the_best_weights(synthetic_config, tmp_path):
    from safetensors.torch import load_file

    summary = train_run(synthetic_config(epochs=3, patience=0, lr=3e-2))
    out = tmp_path / "run"
    assert model_sha256(load_file(str(out / "model.safetensors"))) == summary["model_sha256"]
    best = load_checkpoint(out / "checkpoints" / "best.pt")["model"]
    assert model_sha256(load_file(str(out / "best.safetensors"))) == model_sha256(best)


def test_numpy_rng_state_round_trips_through_a_checkpoint():
    import numpy as np

    from trainkit.devices import numpy_rng_state, set_numpy_rng_state

    np.random.seed(3)
    state = numpy_rng_state()
    expected = np.random.rand(5)
    np.random.rand(7)
    set_numpy_rng_state(state)
    assert np.array_equal(np.random.rand(5), expected)


def test_training_after_the_lr_finder_is_bit_identical_to_training_without_it(synthetic_config, tmp_path, monkeypatch):
    import trainkit.recipes.run as run_module

    plain = train_run(synthetic_config(out=str(tmp_path / "plain"), lr=2e-3))
    real_finder = run_module.resolve_auto_lr

    def finder_then_the_same_lr(*args, **kwargs):
        found = real_finder(*args, **kwargs)  # the sweep really runs on the model about to be trained
        assert len(found["lrs"]) > 10
        return {**found, "suggested_lr": 2e-3}

    monkeypatch.setattr(run_module, "resolve_auto_lr", finder_then_the_same_lr)
    after_finder = train_run(synthetic_config(out=str(tmp_path / "finder"), lr="auto"))
    assert after_finder["lr"] == 2e-3
    assert after_finder["model_sha256"] == plain["model_sha256"]
