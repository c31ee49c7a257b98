"""`trainkit runs` and `trainkit report`: statuses from a run's files and lock, the settings that
differ, and a self-contained HTML page (rendered in headless Chromium where it is installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from trainkit.errors import ConfigError
from trainkit.tracking.report import build_report, curve_svg, write_report
from trainkit.checkpoint.rundir import holding_run_folder
from trainkit.recipes.run import train_run
from trainkit.tracking.runs import find_runs, read_history, read_run, runs_table


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """A finished run at lr 1e-3, one at 3e-3, and an interrupted one (its summary removed)."""
    from trainkit.config.schema import TrainConfig

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
    from trainkit.config.schema import TrainConfig

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


def copies(three_runs, root, *names: str):
    """Copies of run a under ``root``, one per name (the module's runs stay as they are)."""
    for name in names:
        shutil.copytree(three_runs / "a", root / name, ignore=shutil.ignore_patterns(".lock"))
    return [root / name for name in names]


def test_a_damaged_run_is_left_out_with_a_warning_and_the_others_listed(three_runs, tmp_path, caplog, capsys):
    """F5: one history.csv cut off mid-number made `runs` and `report` exit 2 for every run."""
    from trainkit.cli import main

    copies(three_runs, tmp_path, "r1", "r2", "r3")
    with (tmp_path / "r2" / "history.csv").open("a") as handle:
        handle.write("3,2.1e\n")
    caplog.set_level("WARNING", logger="trainkit")
    assert main(["runs", str(tmp_path)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == ["| r1", "| r3"]
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and "r2/history.csv is damaged (line 4: " in warnings[0] and "'2.1e'" in warnings[0]
    assert "\n" not in warnings[0]
    page = build_report([tmp_path])
    assert ">r1<" in page and ">r3<" in page and ">r2<" not in page


def test_a_folder_name_that_is_mathtext_is_drawn_literally(three_runs, tmp_path):
    """F7: a run folder named a$\\frac{1}$b made the report a matplotlib traceback."""
    import matplotlib

    name = r"a$\frac{1}$b"
    (folder,) = copies(three_runs, tmp_path, name)
    page = build_report([folder])
    assert page.count("<svg") == 5 and f"<td>{name}</td>" in page
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as <text>, so the drawn label can be read
        svg = curve_svg([read_run(folder)], "loss", [name])
    assert f"{name}: val_loss" in svg


def test_plot_history_draws_mathtext_like_metric_names_literally(tmp_path):
    """F7 in the run's own plots: a user's metric named like mathtext."""
    from trainkit.tracking.plots import plot_history

    history = [{"epoch": e, "train_a$\\frac{1}$b": 0.5 / e, "val_a$\\frac{1}$b": 0.6 / e, "lr": 1e-3} for e in (1, 2)]
    written = plot_history(history, tmp_path)
    assert sorted(path.name for path in written) == ["a$\\frac{1}$b.png", "lr.png"]
    assert all(path.stat().st_size > 1000 for path in written)


def test_control_characters_in_a_folder_name_never_split_a_table_row(three_runs, tmp_path):
    """F8: a newline in --out split the row of `trainkit runs` over two lines."""
    copies(three_runs, tmp_path, "a\nb", "c|d", "e\x1b[31mf")
    lines = runs_table(tmp_path).splitlines()
    assert len(lines) == 2 + 3 and all(line.startswith("| ") and line.endswith(" |") for line in lines)
    names = sorted(line.split(" | ")[0].removeprefix("| ") for line in lines[2:])
    assert names == [r"a\nb", r"c\|d", r"e\x1b[31mf"]
    assert all(line.count(" | ") == 6 for line in lines[2:])


def long_history(folder, rows: int) -> None:
    """history.csv of ``rows`` validation steps, one loss spike in the middle."""
    lines = ["epoch,step,train_loss,val_loss,lr"]
    lines += [f"1,{i},{1 / i},{10.0 if i == rows // 2 else 2 / i},0.001" for i in range(1, rows + 1)]
    (folder / "history.csv").write_text("\n".join(lines) + "\n")


def test_a_long_history_makes_a_small_report_with_its_extremes_kept(three_runs, tmp_path):
    """F3: one SVG marker per point made a 200,000-row history a 149 MB page."""
    (folder,) = copies(three_runs, tmp_path, "long")
    long_history(folder, 50_000)
    page = build_report([folder])
    assert len(page) < 600_000 and page.count('href="#m') < 200  # tick marks only: no marker per point
    history = read_history(folder / "history.csv")
    assert len(history) == 50_000 and history.columns["val_loss"].nbytes == 8 * 50_000  # 8 bytes a cell

    from trainkit.tracking.plots import MAX_POINTS, downsampled

    xs, ys = downsampled(*history.points("val_loss"))
    assert len(xs) <= MAX_POINTS and list(xs[[0, -1]]) == [1, 50_000]
    assert ys.max() == 10.0 and xs[ys.argmax()] == 25_000  # the spike survives
    assert list(xs) == sorted(xs)


def test_report_refuses_an_out_that_would_destroy_a_file(three_runs, tmp_path):
    """D1b: `report RUN --out RUN/summary.json` replaced the summary with HTML, exit 0."""
    (run,) = copies(three_runs, tmp_path, "run")
    summary = (run / "summary.json").read_bytes()
    for target in (run / "summary.json", run / "config.json", run / "checkpoints" / "best.pt",
                   run / "checkpoints" / "new.html", run / "failure.json"):  # fmt: skip
        for overwrite in (False, True):  # --overwrite never makes a run's own file a report's target
            with pytest.raises(ConfigError, match=r"is a file of the run folder .*run; write the report elsewhere"):
                write_report([run], target, overwrite=overwrite)
    assert (run / "summary.json").read_bytes() == summary and not (run / "failure.json").exists()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not a trainkit report; .* --overwrite"):
        write_report([run], notes)
    assert notes.read_text() == "mine"
    with pytest.raises(ConfigError, match="is a folder"):
        write_report([run], tmp_path)
    assert write_report([run], notes, overwrite=True) == notes and "<svg" in notes.read_text()
    for _ in range(2):  # a new report, then one over the earlier one, in the run folder too
        write_report([run], run / "report.html")
    assert (run / "report.html").read_text().count("<svg") == 5
