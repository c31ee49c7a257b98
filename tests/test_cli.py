"""The command line: an end-to-end run, config files, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainkit.cli import main
from trainkit.exits import EXIT_USAGE
from trainkit.config.files import config_from_dict, load_config_file


def test_train_then_evaluate_end_to_end_in_a_subprocess(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "TRAINKIT_CACHE_DIR": str(tmp_path / "cache")}
    train = subprocess.run(
        [sys.executable, "-m", "trainkit", "train", "--dataset", "synthetic", "--epochs", "2",
         "--batch-size", "64", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    summary = json.loads(train.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert 0.7 < summary["test_accuracy"] <= 1.0  # chance is 0.1
    assert summary["epochs_run"] == 2 and len(summary["model_sha256"]) == 64
    assert "epoch 2/2" in train.stderr

    evaluate = subprocess.run(
        [sys.executable, "-m", "trainkit", "evaluate", str(out / "checkpoints" / "best.pt"), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr
    assert f"test accuracy {summary['test_accuracy']:.4f}" in evaluate.stdout


def test_config_file_values_are_overridden_by_flags(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('dataset = "synthetic"\nepochs = 5\nbatch-size = 64\nlr = 0.002\ndevice = "cpu"\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--epochs", "1", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["epochs"], saved["lr"], saved["batch_size"]) == (1, 0.002, 64)


def test_yaml_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("dataset: synthetic\nepochs: 1\nmodel: cnn\nbatch_size: 256\ndevice: cpu\npatience: 0\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "cnn"


BAD_INPUT = [
    (["train", "--lr", "-0.1"], "--lr must be a positive"),
    (["train", "--lr", "nan"], "--lr must be a positive"),
    (["train", "--dataset", "cifar"], "cifar"),
    (["train", "--data-dir", "/no/such/dir"], "/no/such/dir"),
    (["train", "--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["train", "--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["train", "--epochs", "ten"], "invalid int value"),
    (["train", "--schedule", "linear-ish"], "invalid choice"),
    (["train", "--norm", "instance"], "instance"),
    (["train", "--precision", "fp16", "--device", "cpu"], "bf16"),
    (["train", "--device", "cuda"], "no CUDA GPU"),
    (["train", "--config", "/no/such.toml"], "does not exist"),
    (["train", "--bogus-flag"], "unrecognized arguments"),
    (["train", "--val-size", "0"], "--patience 0"),
    (["train", "--threads", "0"], "--threads must be an integer >= 1"),
    (["evaluate", "/no/such.pt"], "does not exist"),
]


def run_cli(argv: list[str]) -> int:
    """main()'s exit status, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("argv, reason", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_exits_non_zero_with_one_line(argv, reason, tmp_path, capsys):
    if reason == "no CUDA GPU" and torch.cuda.is_available():
        pytest.skip("asserts that this machine has no CUDA GPU")
    if argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path / "run")]
    assert run_cli(argv) == EXIT_USAGE
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert reason in err[0]


def test_bad_config_file_key(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("learning_rate = 0.1\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == EXIT_USAGE
    assert "unknown setting(s) learning_rate" in capsys.readouterr().err


def test_inspect_shows_a_checkpoint_and_flags_a_damaged_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--epochs", "2", "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    path = out / "checkpoints" / "epoch-0002.pt"
    assert main(["inspect", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "verifies (sha256 ok)" in shown and "epoch 2 (end of epoch)" in shown and '"dataset": "synthetic"' in shown
    path.write_bytes(path.read_bytes()[:-1])
    assert main(["inspect", str(path)]) == 1
    assert "FAILS verification" in capsys.readouterr().out


def test_schedules_plot(tmp_path, capsys):
    png = tmp_path / "lr.png"
    assert main(["schedules", "--plot", str(png), "--schedules", "cosine,onecycle", "--steps", "200"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lr_find_writes_curve_suggestions_and_plot(tmp_path, capsys):
    out = tmp_path / "find"
    assert main(["lr-find", "--dataset", "synthetic", "--device", "cpu", "--num-iter", "60", "--out", str(out)]) == 0
    found = json.loads((out / "lr_find.json").read_text())
    assert set(found["suggestions"]) == {"between", "steepest", "minimum_div_10", "valley"}
    assert found["suggested_lr"] == found["suggestions"]["between"]
    assert 1e-7 <= found["suggested_lr"] <= 10
    assert len(found["lrs"]) == len(found["losses"]) == len(found["smoothed_losses"]) <= 60
    assert (out / "lr_find.png").stat().st_size > 0


def test_train_with_lr_auto_uses_and_records_the_finder_suggestion(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--dataset", "synthetic", "--epochs", "3", "--device", "cpu", "--lr", "auto", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    found = json.loads((out / "lr_find.json").read_text())
    assert summary["lr"] == found["suggested_lr"] == summary["lr_finder"]["suggested_lr"]
    assert json.loads((out / "config.json").read_text())["lr"] == "auto"
    assert summary["test_accuracy"] > 0.5  # chance is 0.1


@pytest.mark.parametrize("name", ["mlp_fast", "mlp_best", "cnn_fast", "cnn_995", "cnn_best"])
def test_shipped_recipe_configs_are_valid_and_name_their_model(name):
    values = load_config_file(Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml")
    config = config_from_dict(values).resolved()
    assert config.val_size == 0 and config.patience == 0 and config.schedule == "onecycle"
    assert values["model"] == name.split("_")[0]  # an MLP recipe has no convolution
