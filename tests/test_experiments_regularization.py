"""Regularisation comparison: every variant in the CSV, the gap from the history, the cache."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from trainkit.experiments.core import read_history
from trainkit.experiments.regularization import REPORT_SECTIONS, VARIANTS, compare_regularization

from experiment_checks import assert_rerun_recomputes_only

SETTINGS = ("model", "norm", "dropout", "drop_path", "weight_decay", "norm_after_dropout")
EXPECTED_SETTINGS = {  # variant -> SETTINGS
    "dropout-0.0": ("mlp", "batch", 0.0, 0.0, 0.01, False),
    "dropout-0.1": ("mlp", "batch", 0.1, 0.0, 0.01, False),
    "dropout-0.3": ("mlp", "batch", 0.3, 0.0, 0.01, False),
    "dropout-0.5": ("mlp", "batch", 0.5, 0.0, 0.01, False),
    "drop_path-0.0": ("residual_mlp", "layer", 0.0, 0.0, 0.01, False),
    "drop_path-0.1": ("residual_mlp", "layer", 0.0, 0.1, 0.01, False),
    "drop_path-0.2": ("residual_mlp", "layer", 0.0, 0.2, 0.01, False),
    "weight_decay-0.0": ("mlp", "batch", 0.0, 0.0, 0.0, False),
    "weight_decay-0.05": ("mlp", "batch", 0.0, 0.0, 0.05, False),
    "norm_after_dropout-0.3": ("mlp", "batch", 0.3, 0.0, 0.01, True),
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reg") / "cmp"
    return out, compare_regularization(out, quick=True)


def read_csv(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_quick_mode_writes_every_variant_with_its_settings(quick_run):
    out, _ = quick_run
    written = read_csv(out / "results.csv")
    assert [row["variant"] for row in written] == list(EXPECTED_SETTINGS) == list(VARIANTS)
    assert list(written[0]) == ["variant", "seed", "train_accuracy", "val_accuracy", "gap", "best_val_accuracy",
                                "test_accuracy", "wall_seconds"]  # fmt: skip
    epochs = set()
    for row in written:
        config = json.loads((out / "runs" / f"{row['variant']}-seed0" / "config.json").read_text())
        assert tuple(config[name] for name in SETTINGS) == EXPECTED_SETTINGS[row["variant"]]
        assert config["patience"] == 0
        epochs.add(config["epochs"])
        for column in ("train_accuracy", "val_accuracy", "best_val_accuracy", "test_accuracy"):
            assert 0.0 <= float(row[column]) <= 1.0
    assert len(epochs) == 1, "every variant gets the same budget"
    for name in ("report.md", "train_val_gap.png", "val_accuracy.png"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    for title, labelled in REPORT_SECTIONS.items():
        assert f"## {title}" in report
        assert all(f"| {label} | 1 |" in report for label, _ in labelled)


def test_gap_is_the_last_history_rows_train_minus_val_accuracy(quick_run):
    out, rows = quick_run
    for row in read_csv(out / "results.csv"):
        last = read_history(out / "runs" / f"{row['variant']}-seed0" / "history.csv")[-1]
        assert float(row["train_accuracy"]) == last["train_accuracy"]
        assert float(row["val_accuracy"]) == last["val_accuracy"]
        assert float(row["gap"]) == last["train_accuracy"] - last["val_accuracy"]
    assert any(row["gap"] != 0.0 for row in rows)


def test_a_rerun_skips_finished_cells_and_reproduces_the_rows(quick_run, tmp_path, caplog):
    out = tmp_path / "cmp"
    shutil.copytree(quick_run[0], out)
    assert_rerun_recomputes_only(compare_regularization, out, quick_run[1], "drop_path-0.1-seed0", len(VARIANTS), caplog)
