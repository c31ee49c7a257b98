"""Normalisation comparison: every cell in the CSV, the sqrt lr rule, the cache, the eval-mode pitfall."""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil

import pytest
import torch

from trainkit.config.schema import TrainConfig
from trainkit.data.device import DeviceBatches
from trainkit.recipes.images import load_dataset
from trainkit.errors import ConfigError
from trainkit.experiments.norm import BASE_LR, BATCH_SIZES, NORMS_BY_MODEL, compare_norm, eval_mode_pitfall, scaled_lr
from trainkit.nn.models import cnn, mlp
from trainkit.loop.trainer import Trainer

from experiment_checks import assert_rerun_recomputes_only

EXPECTED_CELLS = {
    (model, norm, size)
    for model, norms in NORMS_BY_MODEL.items()
    for norm in norms
    for size in BATCH_SIZES
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("norm") / "cmp"
    return out, compare_norm(out, quick=True)


def run_config(out, model, norm, batch_size):
    return json.loads((out / "runs" / f"{model}-{norm}-bs{batch_size}-seed0" / "config.json").read_text())


def read_csv(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_quick_mode_writes_every_cell_with_the_sqrt_lr(quick_run):
    out, _ = quick_run
    written = read_csv(out / "results.csv")
    keys = [(r["model"], r["norm"], int(r["batch_size"])) for r in written]
    assert len(keys) == len(EXPECTED_CELLS) == 28 and set(keys) == EXPECTED_CELLS
    assert list(written[0]) == ["model", "norm", "batch_size", "lr", "seed", "test_accuracy", "best_val_accuracy",
                                "final_train_loss", "wall_seconds"]  # fmt: skip
    for row in written:
        assert float(row["lr"]) == BASE_LR * math.sqrt(int(row["batch_size"]) / 128)
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0 and 0.0 <= float(row["best_val_accuracy"]) <= 1.0
        assert math.isfinite(float(row["final_train_loss"])) and float(row["wall_seconds"]) > 0
        config = run_config(out, row["model"], row["norm"], row["batch_size"])
        assert (config["norm"], config["batch_size"], config["lr"], config["patience"]) == (
            row["norm"], int(row["batch_size"]), float(row["lr"]), 0
        )  # fmt: skip
    epochs = {run_config(out, *cell)["epochs"] for cell in EXPECTED_CELLS}
    assert len(epochs) == 1, "every cell gets the same number of epochs"
    for name in ("report.md", "accuracy_vs_batch_size.png", "wall_seconds_vs_batch_size.png"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert all(f"| {model} | {norm} |" in report for model, norm, _ in EXPECTED_CELLS)
    assert "| model | norm | batch 8 | batch 32 | batch 128 | batch 512 |" in report


def test_quick_mode_reports_the_eval_mode_pitfall(quick_run):
    out, _ = quick_run
    pitfall = {probe["model"]: probe for probe in json.loads((out / "eval_mode_pitfall.json").read_text())}
    cnn_probe, mlp_probe = pitfall["cnn"], pitfall["mlp"]
    assert cnn_probe["cell"] == "cnn-batch-bs128-seed0"
    assert cnn_probe["eval_accuracy"] == cnn_probe["reported_test_accuracy"], "eval mode reproduces train_run's test"
    assert 0.0 <= cnn_probe["train_mode_batch1_accuracy"] <= 1.0 and cnn_probe["error"] is None
    assert cnn_probe["gap"] == pytest.approx(cnn_probe["eval_accuracy"] - cnn_probe["train_mode_batch1_accuracy"])
    assert "Expected more than 1 value per channel" in mlp_probe["error"] and mlp_probe["gap"] is None
    report = (out / "report.md").read_text()
    assert "Eval-mode pitfall" in report and "| cnn-batch-bs128-seed0 |" in report


def test_a_rerun_skips_finished_cells_and_reproduces_the_rows(quick_run, tmp_path, caplog):
    out = tmp_path / "cmp"
    shutil.copytree(quick_run[0], out)
    assert_rerun_recomputes_only(compare_norm, out, quick_run[1], "mlp-layer-bs32-seed0", len(EXPECTED_CELLS), caplog)


def test_lr_scaling_rules(tmp_path):
    assert scaled_lr(1e-3, 512, 128, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 8, 128, "sqrt") == pytest.approx(2.5e-4)
    assert scaled_lr(1e-3, 512, 128, "linear") == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 8, 128, "none") == 1e-3
    with pytest.raises(ConfigError, match="lr_scaling"):
        compare_norm(tmp_path, quick=True, lr_scaling="cubic")
    assert not (tmp_path / "cells").exists(), "rejected before any training"


@pytest.fixture(scope="module")
def synthetic_data():
    return load_dataset("synthetic", val_size=200, seed=0)


def briefly_trained(model, data):
    """A few steps, so BatchNorm's running statistics are learned rather than the defaults."""
    trainer = Trainer(model, TrainConfig(dataset="synthetic", epochs=1, batch_size=64, device="cpu", patience=0))
    trainer.fit(DeviceBatches(data.train.x[:640], data.train.y[:640], 64, seed=0))
    return trainer


def test_pitfall_eval_accuracy_matches_the_trainer_and_leaves_the_model_untouched(synthetic_data):
    torch.manual_seed(0)
    trainer = briefly_trained(cnn(channels=(4, 8), norm="batch"), synthetic_data)
    model = trainer.model.train()  # the caller's mode must survive too
    x, y = synthetic_data.test.x[:300], synthetic_data.test.y[:300]
    before = copy.deepcopy(model.state_dict())

    probe = eval_mode_pitfall(model, x, y, eval_batch_size=128)

    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before), "weights and BatchNorm buffers unchanged"
    expected = trainer.evaluate(DeviceBatches(x, y, 1024, shuffle=False))["accuracy"]
    assert probe["eval_accuracy"] == expected
    one_at_a_time = copy.deepcopy(model).train()
    with torch.no_grad():
        correct = sum(int(one_at_a_time(x[i : i + 1]).argmax(1) == y[i]) for i in range(len(x)))
    assert probe["train_mode_batch1_accuracy"] == correct / len(x)
    assert probe["gap"] == probe["eval_accuracy"] - probe["train_mode_batch1_accuracy"] and probe["error"] is None


def test_pitfall_on_a_batchnorm_mlp_records_that_batch_one_is_refused(synthetic_data):
    torch.manual_seed(0)
    model = briefly_trained(mlp(hidden=(32,), norm="batch"), synthetic_data).model
    x, y = synthetic_data.test.x[:100], synthetic_data.test.y[:100]
    probe = eval_mode_pitfall(model, x, y)
    assert "Expected more than 1 value per channel" in probe["error"]
    assert probe["train_mode_batch1_accuracy"] is None and 0.0 <= probe["eval_accuracy"] <= 1.0
