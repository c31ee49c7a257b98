"""Comparison experiments: every cell in the CSV, cached cells are not re-run."""

from __future__ import annotations

import csv

from trainkit.experiments.schedules import COMPARED_SCHEDULES, compare_schedules

from experiment_checks import assert_rerun_recomputes_only


def test_quick_schedule_comparison_writes_every_cell_and_reuses_the_cache(tmp_path, caplog):
    out = tmp_path / "cmp"
    rows = compare_schedules(out, quick=True)
    assert [row["schedule"] for row in rows] == list(COMPARED_SCHEDULES)
    with (out / "results.csv").open() as handle:
        written = list(csv.DictReader(handle))
    assert [r["schedule"] for r in written] == list(COMPARED_SCHEDULES)
    for row in written:
        assert 0.0 < float(row["best_val_accuracy"]) <= 1.0 and 0.0 < float(row["test_accuracy"]) <= 1.0
        assert float(row["wall_seconds"]) > 0
    for name in ("report.md", "lr_schedules.png", "val_accuracy.png"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert all(f"| {name} | 1 |" in report for name in COMPARED_SCHEDULES)

    assert_rerun_recomputes_only(compare_schedules, out, rows, "cosine-seed0", len(COMPARED_SCHEDULES), caplog)


def test_a_changed_config_invalidates_the_cached_cell(tmp_path, caplog):
    from trainkit.config.schema import TrainConfig
    from trainkit.experiments.core import Cell, run_cells

    calls = []

    def fake_run(cell):
        calls.append(cell.key)
        return {"value": cell.config.lr}

    cell = Cell("a", "g", TrainConfig(lr=1e-3))
    assert run_cells([cell], tmp_path, fake_run)[0]["value"] == 1e-3
    assert run_cells([cell], tmp_path, fake_run)[0]["value"] == 1e-3
    changed = Cell("a", "g", TrainConfig(lr=2e-3))
    assert run_cells([changed], tmp_path, fake_run)[0]["value"] == 2e-3
    assert calls == ["a", "a"]
