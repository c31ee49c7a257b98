"""Init comparison: every cell in the CSV, naive inits visibly explode, the cache, divergence as a result."""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path

import pytest

from trainkit.experiments import init as init_experiment
from trainkit.experiments.init import INIT_SCHEMES_COMPARED, compare_init

ACTIVATIONS = ("relu", "tanh")
COLUMNS = [
    "activation", "init", "seed", "init_last_std", "init_min_grad_norm", "init_max_grad_norm", "dead_fraction",
    "loss_at_steps", "best_val_accuracy", "test_accuracy", "diverged", "wall_seconds",
]  # fmt: skip


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def without_wall_time(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "wall_seconds"} for row in rows]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """One quick comparison shared by the tests below (synthetic data: nothing to download)."""
    out = tmp_path_factory.mktemp("init") / "cmp"
    return out, compare_init(out, quick=True)


def test_quick_comparison_writes_a_well_formed_row_per_cell(quick_run):
    out, rows = quick_run
    written = read_csv(out / "results.csv")

    assert list(written[0]) == COLUMNS
    every_cell = [(activation, scheme) for activation in ACTIVATIONS for scheme in INIT_SCHEMES_COMPARED]
    assert [(row["activation"], row["init"]) for row in written] == every_cell
    for row in written:
        assert row["seed"] == "0" and row["diverged"] == "False"
        assert 0.0 < float(row["best_val_accuracy"]) <= 1.0 and 0.0 < float(row["test_accuracy"]) <= 1.0
        assert 0 < float(row["init_min_grad_norm"]) <= float(row["init_max_grad_norm"])
        assert float(row["loss_at_steps"]) > 0 and float(row["wall_seconds"]) > 0
        assert (row["dead_fraction"] == "") == (row["activation"] == "tanh"), "dead ReLUs only for relu"
    for name in ("report.md", "init_activation_std.png", "init_grad_norm.png", "val_accuracy_relu.png"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert all(f"| {a} | {s} | 1 | 0 |" in report for a in ACTIVATIONS for s in INIT_SCHEMES_COMPARED)


def test_naive_inits_start_a_deep_relu_mlp_orders_of_magnitude_louder_than_kaiming(quick_run):
    _, rows = quick_run
    last_std = {row["init"]: row["init_last_std"] for row in rows if row["activation"] == "relu"}

    assert 0.1 < last_std["kaiming_normal"] < 10
    # U[-1, 1] (variance 1/3) and N(0, 1) on 64-wide layers multiply the std by ~3 and ~6 per layer
    assert last_std["uniform"] > 100 * last_std["kaiming_normal"]
    assert last_std["normal"] > 10 * last_std["uniform"]


def test_a_second_run_reuses_every_cell_and_reproduces_the_rows(quick_run, caplog):
    out, rows = quick_run
    with caplog.at_level(logging.INFO, logger="trainkit"):
        again = compare_init(out, quick=True)

    assert caplog.text.count(": cached") == len(ACTIVATIONS) * len(INIT_SCHEMES_COMPARED)
    assert ": running" not in caplog.text
    assert without_wall_time(again) == without_wall_time(rows)


def test_a_diverging_cell_is_recorded_and_cached_not_raised(tmp_path, monkeypatch, caplog):
    real_train_run = init_experiment.train_run

    def blow_up_the_normal_init(config, **options):
        if config.init == "normal":
            config = dataclasses.replace(config, lr=1e12)  # a real NaN from the real trainer
        return real_train_run(config, **options)

    monkeypatch.setattr(init_experiment, "train_run", blow_up_the_normal_init)
    out = tmp_path / "cmp"
    compare_init(out, quick=True, activations=("relu",), depth=3, width=16)

    by_init = {row["init"]: row for row in read_csv(out / "results.csv")}
    assert list(by_init) == list(INIT_SCHEMES_COMPARED)
    assert by_init["normal"]["diverged"] == "True"
    assert by_init["normal"]["best_val_accuracy"] == by_init["normal"]["test_accuracy"] == ""
    assert float(by_init["normal"]["init_last_std"]) > 0, "the signal at init is still reported"
    assert all(row["diverged"] == "False" for init, row in by_init.items() if init != "normal")
    report = (out / "report.md").read_text()
    assert "| relu | normal | 1 | 1 |" in report and "Diverged runs: relu normal seed 0." in report

    with caplog.at_level(logging.INFO, logger="trainkit"):
        compare_init(out, quick=True, activations=("relu",), depth=3, width=16)
    assert caplog.text.count(": cached") == len(INIT_SCHEMES_COMPARED), "the diverged cell is cached too"
    # compared as CSV text: a diverged run's loss may be NaN, which never equals itself
    assert without_wall_time(read_csv(out / "results.csv")) == without_wall_time(list(by_init.values()))
