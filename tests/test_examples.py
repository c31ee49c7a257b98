"""The examples in examples/ run as a user runs them, and what they measure is checked.

Each example runs in a subprocess with small flags (seconds, not minutes) and prints one line
of JSON last; the tests assert on those measured numbers, with thresholds set well below what
was measured (see each test) so that a real regression fails and noise does not. The CLI test
trains examples/regression_tabular.py's factories with ``trainkit train`` and re-evaluates the
best checkpoint with ``trainkit evaluate``.

All subprocesses start together when the first test needs one (the ``started`` fixture), each
with one torch thread (OMP_NUM_THREADS=1): the models are tiny, extra threads only fight over
the cores (a step measured 10x slower on a loaded 2-core machine), and single-threaded runs
side by side take about half the wall time of one after another.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the in-process tests import the examples' helpers

import char_lm  # noqa: E402
import image_folder  # noqa: E402
import regression_tabular  # noqa: E402


def example_env() -> dict[str, str]:
    return {**os.environ, "TRAINKIT_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


class Started:
    """A subprocess started now, its output going to files; ``finish`` waits for it."""

    def __init__(self, args: list[str], logs: Path, cwd: Path = EXAMPLES) -> None:
        self.args, self.stdout, self.stderr = args, logs / "stdout.txt", logs / "stderr.txt"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen(args, cwd=cwd, env=example_env(), stdout=out, stderr=err, text=True)

    def finish(self, timeout: float = 240) -> str:
        """Its stdout, once it exited 0 (else the end of its stderr as the failure)."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        assert code == 0, f"{' '.join(self.args)} exited {code}:\n{self.stderr.read_text()[-4000:]}"
        return self.stdout.read_text()

    def last_json(self) -> dict:
        return json.loads(self.finish().strip().splitlines()[-1])


TRAINKIT = [sys.executable, "-m", "trainkit"]
CLI_TRAIN = ["train", "--model", "regression_tabular:make_model", "--dataset", "regression_tabular:make_datasets",
             "--task", "regression", "--metrics", "mae,r2", "--epochs", "3", "--device", "cpu"]  # fmt: skip
SMALL_RUNS = {  # a few seconds each
    "regression": ["regression_tabular.py", "--epochs", "40", "--patience", "10"],
    "two_inputs": ["two_inputs.py", "--train-size", "2000", "--val-size", "1000", "--epochs", "5"],
    "image_folder": ["image_folder.py", "--per-class", "60", "--epochs", "5", "--batch-size", "16",
                     "--num-workers", "2"],
    "char_lm": ["char_lm.py", "--chars", "40000", "--max-steps", "60", "--sample-chars", "40"],
}


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> dict[str, Started]:
    """Every run of this file started at once (the CLI evaluation waits for its training run):
    each is single-threaded, so two cores finish them in about half the time of one after another."""
    runs = {name: Started([sys.executable, *args], tmp_path_factory.mktemp(name)) for name, args in SMALL_RUNS.items()}
    cli_out = tmp_path_factory.mktemp("cli") / "run"
    runs["cli_train"] = Started([*TRAINKIT, *CLI_TRAIN, "--out", str(cli_out)], cli_out.parent)
    runs["cli_train"].out = cli_out
    yield runs
    for run in runs.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


# ------------------------------------------------------------------ the four examples, end to end
def test_regression_example_explains_the_test_split(started):
    # measured: test R² 0.537, MAE 0.497 (standardised), ridge 0.523; predicting the mean is R² ~0, MAE ~0.8
    result = started["regression"].last_json()
    assert math.isfinite(result["test_r2"]) and result["test_r2"] > 0.3, result
    assert math.isfinite(result["test_mae"]) and result["test_mae"] < 0.7, result
    assert result["test_mae_target_units"] == pytest.approx(result["test_mae"] * 77.0, rel=0.2)  # target std ~77
    assert 1 <= result["best_epoch"] <= result["epochs_run"] <= 40


def test_two_input_example_needs_both_inputs(started):
    # measured: 0.902 with both inputs, 0.503 numbers only, 0.389 category only (chance 0.333)
    result = started["two_inputs"].last_json()
    assert result["val_accuracy"] > 0.75, result
    assert result["val_accuracy"] > result["numbers_only_accuracy"] + 0.2, result
    assert result["val_accuracy"] > result["category_only_accuracy"] + 0.2, result
    assert result["numbers_only_accuracy"] > result["chance"] + 0.05, result  # the numbers alone carry some signal


def test_image_folder_example_learns_the_demo_folder_with_workers(started):
    # measured: 0.911 on 45 validation images (chance 0.333)
    result = started["image_folder"].last_json()
    assert result["classes"] == ["checker", "horizontal", "vertical"]
    assert (result["train_images"], result["val_images"]) == (135, 45)
    assert result["val_accuracy"] > result["chance"] + 0.25, result


@pytest.mark.skipif(not char_lm.DEFAULT_TEXT.is_file(), reason=f"no {char_lm.DEFAULT_TEXT}")
def test_char_lm_example_learns_from_context(started):
    # measured: val loss 2.06 nats/char against a unigram entropy of 3.05; token accuracy 0.44
    result = started["char_lm"].last_json()
    assert result["val_loss"] < result["unigram_entropy"] - 0.3, result
    assert result["final_train_loss"] < result["unigram_entropy"] - 0.3, result
    assert result["val_perplexity"] == pytest.approx(math.exp(result["val_loss"]), rel=1e-6)
    assert result["val_token_accuracy"] > 0.3, result  # the commonest character (space) is ~0.2
    assert result["optimizer_steps"] == 60
    assert result["sample"].startswith("And God said") and len(result["sample"]) == len("And God said") + 40


# ------------------------------------------------------------------ the CLI with the example's factories
def test_cli_trains_the_regression_factories_and_evaluate_reproduces_the_test_numbers(started, tmp_path):
    training = started["cli_train"]
    training.finish()
    summary = json.loads((training.out / "summary.json").read_text())
    for key in ("test_r2", "test_mae", "test_loss"):
        assert math.isfinite(summary[key]), summary
    assert len(summary["model_sha256"]) == 64 and summary["epochs_run"] == 3

    best = training.out / "checkpoints" / "best.pt"
    printed = Started([*TRAINKIT, "evaluate", str(best), "--device", "cpu", *CLI_TRAIN[1:5]], tmp_path).finish()
    for name in ("mae", "r2", "loss"):
        assert f"{name} {summary['test_' + name]:.4f}" in printed, (printed, summary)
    assert "on 88 samples" in printed  # the factory rebuilt the same 20% test split


# ------------------------------------------------------------------ the examples' helpers, in process
def test_regression_factory_standardises_with_training_statistics_only():
    train, val, test = regression_tabular.make_datasets()
    x, y = train.tensors
    assert x.mean(0).abs().max() < 1e-5 and (x.std(0) - 1).abs().max() < 1e-5 and abs(float(y.mean())) < 1e-5
    assert (len(train), len(val), len(test)) == (266, 88, 88)
    assert float(val.tensors[1].mean()) != pytest.approx(0.0, abs=1e-4)  # not standardised with its own mean
    again = regression_tabular.make_datasets()[2]  # `trainkit evaluate` rebuilds it: must be the same rows
    assert torch.equal(again.tensors[0], test.tensors[0])
    assert regression_tabular.make_model(hidden=8)(x[:5]).shape == (5, 1)


def test_image_folder_reads_class_subfolders_and_augments_from_torch_rng(tmp_path):
    root = image_folder.make_demo_folder(tmp_path, per_class=4, seed=0)
    plain, augmented = image_folder.ImageFolder(root), image_folder.ImageFolder(root, augment=True)
    assert plain.classes == ["checker", "horizontal", "vertical"] and len(plain) == 12
    image, label = plain[5]
    assert image.shape == (3, 16, 16) and label == 1 and -0.5 <= float(image.min()) <= float(image.max()) <= 0.5
    assert torch.equal(plain[5][0], image)  # no augmentation: the same pixels every time
    torch.manual_seed(1)
    first = augmented[5][0]
    torch.manual_seed(1)
    assert torch.equal(augmented[5][0], first)  # augmentation is a function of torch's RNG state
    assert any(not torch.equal(augmented[5][0], first) for _ in range(10))


def test_generate_continues_the_prompt_with_training_characters():
    torch.manual_seed(0)
    model = char_lm.CharGRU(list(" Gadnos"), hidden=8)
    sample = char_lm.generate(model, "God", 25, seed=3)
    assert sample.startswith("God") and len(sample) == 28 and set(sample) <= set(" Gadnos")
    assert char_lm.generate(model, "God", 25, seed=3) == sample  # seeded
    with pytest.raises(ValueError, match="unknown"):
        char_lm.generate(model, "Zeus", 5)
    assert char_lm.unigram_entropy("abab") == pytest.approx(math.log(2))
