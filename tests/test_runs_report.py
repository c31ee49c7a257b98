"""`trainkit runs` and `trainkit report`: statuses from a run's files and lock, the settings that
differ, and a self-contained HTML page (rendered in headless Chromium where it is installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from trainkit.errors import ConfigError
from trainkit.report import build_report
from trainkit.rundir import holding_run_folder
from trainkit.run import train_run
from trainkit.runs import find_runs, read_run, runs_table


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """A finished run at lr 1e-3, one at 3e-3, and an interrupted one (its summary removed)."""
    from trainkit.config import TrainConfig

    root = tmp_path_factory.mktemp("runs")
    for name, lr in (("a", 1e-3), ("b", 3e-3), ("c", 1e-3)):
        train_run(TrainConfig(dataset="synthetic", epochs=2, batch_size=64, device="cpu", lr=lr, out=str(root / name)))
    (root / "c" / "summary.json").unlink()
    return root


def test_runs_lists_each_status_and_only_the_settings_that_differ(three_runs):
    assert [p.name for p in find_runs(three_runs)] == ["a", "b", "c"]
    lines = runs_table(three_runs).splitlines()
    a, b, c = lines[2:]
    assert "| a | finished | 2 |" in a and "lr=0.001 |" in a
    assert "| b | finished |" in b and "lr=0.003 |" in b
    assert "| c | interrupted |" in c
    assert "epochs=" not in a  # the same in every run: not a difference
    summary = json.loads((three_runs / "a" / "summary.json").read_text())
    assert f"accuracy {summary['test_accuracy']:.4g}" in a


def test_a_run_held_by_a_live_process_is_running_and_a_failed_one_names_its_error(three_runs):
    with holding_run_folder(three_runs / "c"):
        assert read_run(three_runs / "c").status == "running"
    (three_runs / "c" / "failure.json").write_text(json.dumps({"error": "the loss became NaN at step 7"}))
    try:
        assert "failed: the loss became NaN at step 7" in runs_table(three_runs)
    finally:
        (three_runs / "c" / "failure.json").unlink()


def test_no_runs_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="no trainkit runs under"):
        runs_table(tmp_path)
    with pytest.raises(ConfigError, match="is not a folder"):
        runs_table(tmp_path / "missing")


def test_the_report_inlines_every_curve_and_fetches_nothing(three_runs):
    page = build_report([three_runs])
    assert page.count("<svg") == len({"loss", "accuracy", "lr", "grad_norm", "clip_fraction"}) and "lr" in page
    assert not re.search(r'(src|href)="(?!data:)[^"#]', page)  # no external or relative resource
    assert "<td>lr</td><td>0.001</td><td>0.003</td><td>0.001</td>" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium package is not installed (CI installs it)")
def test_headless_chromium_renders_the_report_with_its_plots(three_runs, tmp_path):
    from PIL import Image

    page = tmp_path / "report.html"
    page.write_text(build_report([three_runs]))
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2400", page.as_uri()], check=True, capture_output=True, timeout=120)  # fmt: skip
    pixels = Image.open(shot).convert("RGB")
    blue = sum(1 for r, g, b in pixels.getdata() if b > 150 and r < 100)  # matplotlib's C0 lines
    assert blue > 200, "no plotted line in the screenshot"


def test_a_refused_start_on_a_finished_run_does_not_mark_that_run_failed(three_runs):
    from trainkit.config import TrainConfig

    with pytest.raises(ConfigError, match="already holds a run"):
        train_run(TrainConfig(dataset="synthetic", epochs=2, device="cpu", out=str(three_runs / "a")))
    assert not (three_runs / "a" / "failure.json").exists()
    assert read_run(three_runs / "a").status == "finished"


def test_a_comparison_folder_gets_report_html_with_every_plot_inlined(tmp_path):
    from trainkit.cli import main

    out = tmp_path / "schedules"
    assert main(["compare", "schedules", "--quick", "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    plots = sorted(path.name for path in out.glob("*.png"))
    assert plots and page.count('<img src="data:image/png;base64,') == len(plots)
    assert not re.search(r'(src|href)="(?!data:)[^"#]', page)
    assert "<table>" in page  # report.md's tables rendered


def test_a_damaged_history_is_one_line_naming_the_file(three_runs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(three_runs / "a", broken)
    (broken / "history.csv").write_text("epoch,train_loss\n1,not-a-number\n")
    with pytest.raises(ConfigError, match=r"the run's history .*broken/history.csv is damaged"):
        build_report([broken])
