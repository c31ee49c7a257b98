"""The sequence-model comparisons (warmup, clipping) in --quick form: every cell, its per-step
traces, the figures derived from them, and the per-cell cache."""

from __future__ import annotations

import csv
import math

from experiment_checks import assert_rerun_recomputes_only
from trainkit.experiments.clipping import CLIPPING, compare_clipping
from trainkit.experiments.sequence import smoothed, spike_count
from trainkit.experiments.warmup import POSITIONS, QUICK, compare_warmup


def test_quick_warmup_comparison_traces_every_step_of_every_cell(tmp_path, caplog):
    out = tmp_path / "warmup"
    rows = compare_warmup(out, quick=True)
    cells = len(POSITIONS) * len(QUICK["lrs"]) * len(QUICK["warmups"])
    assert len(rows) == cells
    assert {(r["norm_position"], r["warmup_steps"]) for r in rows} == {(p, w) for p in POSITIONS for w in (0, 10)}
    for row in rows:
        assert row["steps_run"] == QUICK["steps"] and math.isfinite(row["max_grad_norm"])
        assert row["val_loss"] > 0
    with (out / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == cells
    for name in ("report.md", "loss_pre.png", "loss_post.png", "grad_norm_pre.png", "grad_norm_post.png"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "| post-norm lr 0.03 warmup none (0 steps) | 1 |" in report
    assert_rerun_recomputes_only(compare_warmup, out, rows, "post-lr0.03-warmupnone-seed0", cells, caplog)


def test_quick_clipping_comparison_counts_what_each_threshold_clipped(tmp_path):
    rows = compare_clipping(tmp_path / "clip", quick=True)
    assert len(rows) == len(CLIPPING)
    by_cell = {(r["model"], r["clipping"]): r for r in rows}
    for model in ("lstm",):
        unclipped, at_one, at_five = (by_cell[model, name] for name in ("none", "norm 1", "norm 5"))
        assert unclipped["clipped_fraction"] == 0 and by_cell[model, "value 0.1"]["clipped_fraction"] == 0
        assert 0 < at_one["clipped_fraction"] <= 1, "a high lr makes gradient norms exceed 1"
        assert at_five["clipped_fraction"] <= at_one["clipped_fraction"]


def test_spikes_and_smoothing():
    assert spike_count([1.0, 1.1, 0.9, 6.0, float("nan")]) == 2  # above 5x the median, and the NaN
    assert spike_count([]) == 0
    assert smoothed([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]


def test_quick_transformer_init_comparison_measures_the_residual_stream(tmp_path):
    from trainkit.experiments.transformer_init import QUICK as INIT_QUICK, SCHEMES, compare_transformer_init

    rows = compare_transformer_init(tmp_path / "init", quick=True)
    assert len(rows) == len(SCHEMES) * len(INIT_QUICK["depths"])
    by = {(r["init"], r["layers"]): r for r in rows}
    deep = max(INIT_QUICK["depths"])
    # without the residual scaling the stream grows more with depth; PyTorch's N(0, 1) embeddings dwarf the blocks
    assert by["gpt", deep]["stream_growth"] < by["gpt_unscaled", deep]["stream_growth"]
    assert by["default", deep]["stream_std_embedding"] > 10 * by["gpt", deep]["stream_std_embedding"]
    assert (tmp_path / "init" / "residual_stream_std.png").stat().st_size > 0


def test_quick_sequence_norm_comparison_runs_every_norm_in_both_models(tmp_path):
    from trainkit.experiments.sequence_norm import compare_sequence_norm
    from trainkit.choices import SEQUENCE_NORMS

    rows = compare_sequence_norm(tmp_path / "norm", quick=True)
    assert {(r["model"], r["norm"]) for r in rows} == {("transformer", n) for n in SEQUENCE_NORMS}
    assert all(isinstance(r["final_train_loss"], float) and r["val_loss"] != "" for r in rows)
