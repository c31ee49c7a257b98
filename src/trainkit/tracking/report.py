"""`trainkit report DIR... --out report.html`: one self-contained HTML page of runs and comparisons.

Nothing on the page is fetched: the curves are inline SVG (matplotlib), a comparison's PNG plots
are ``data:`` URIs, the styles are inline. It opens from a file, mailed or archived, with no
network and no server. A DIR is a run folder, a folder of runs (``trainkit runs`` finds them) or
a comparison folder (``trainkit compare`` output: ``report.md`` and its plots).

``--out`` never destroys anything without ``overwrite``: a run folder's own files (a report
written over summary.json took the run's test metrics) and existing files other than an earlier
report are refused.
"""

from __future__ import annotations

import base64
import html
import io
import re
import time
from collections.abc import Sequence
from pathlib import Path

from trainkit.errors import ConfigError, TrainkitError
from trainkit.tracking.plots import agg_figure, literal, plot_curve
from trainkit.checkpoint.rundir import run_folder_of, write_atomically
from trainkit.tracking.runs import RunInfo, differing_settings, find_runs, read_runs

CURVE_SKIP = ("epoch", "step", "epoch_seconds", "samples_per_second", "skipped_steps")
STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}.curves{display:flex;flex-wrap:wrap;gap:1em}.curves figure{margin:0}
img{max-width:100%}code{background:#f3f3f3;padding:0 .2em}"""
PAGE_START = '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>trainkit report</title>'


def curve_names(runs: Sequence[RunInfo]) -> list[str]:
    """One plot per quantity: loss, each metric, lr, grad_norm (train_ and val_ on one plot)."""
    columns = dict.fromkeys(column for run in runs for column in run.history.columns)
    names = dict.fromkeys(column.split("_", 1)[1] if column.startswith(("train_", "val_")) else column
                          for column in columns if column not in CURVE_SKIP)  # fmt: skip
    return list(names)


def curve_svg(runs: Sequence[RunInfo], name: str, labels: Sequence[str]) -> str:
    """The runs' curves of one quantity overlaid: solid validation, dashed training."""
    figure = agg_figure((5.5, 3.6))
    ax = figure.subplots()
    for index, (run, label) in enumerate(zip(runs, labels)):
        for column, style in ((f"val_{name}", "-"), (f"train_{name}", "--"), (name, "-")):
            xs, ys = run.history.points(column)
            if len(xs):
                plot_curve(ax, xs, ys, f"{label}: {column}", style, markersize=2, color=f"C{index % 10}")
    ax.set_title(literal(name))
    ax.set_xlabel("optimizer step" if any(len(run.history.points("step")[0]) for run in runs) else "epoch")
    if name == "lr" and all((run.history.points("lr")[1] > 0).all() for run in runs):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    return re.sub(r"^<\?xml[^>]*>\s*(<!DOCTYPE[^>]*>)?", "", buffer.getvalue().strip())  # inline, no prolog


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = lambda tag, values: "".join(f"<{tag}>{html.escape(str(v))}</{tag}>" for v in values)  # noqa: E731
    return ("<table><tr>" + cells("th", header) + "</tr>"
            + "".join("<tr>" + cells("td", row) + "</tr>" for row in rows) + "</table>")  # fmt: skip


def runs_section(runs: list[RunInfo], labels: list[str]) -> str:
    differing = differing_settings(runs)
    keys = sorted({key for run in runs for key, value in run.summary.items() if not isinstance(value, (dict, list))})
    parts = ["<h2>Runs</h2>", table(["run", "status", "folder"], [[l, r.status, r.path] for r, l in zip(runs, labels)])]
    if differing:
        parts += ["<h2>Settings that differ</h2>",
                  table(["setting", *labels], [[key, *(run.config.get(key, "–") for run in runs)] for key in differing])]  # fmt: skip
    curves = [f"<figure>{curve_svg(runs, name, labels)}</figure>" for name in curve_names(runs)]
    parts += ["<h2>Curves</h2>", f'<div class="curves">{"".join(curves)}</div>']
    if keys:
        rows = [[key, *(shown(run.summary.get(key, "–")) for run in runs)] for key in keys]
        parts += ["<h2>Summaries</h2>", table(["", *labels], rows)]
    return "\n".join(parts)


def shown(value: object) -> object:
    """Floats to 6 significant digits (the files keep every digit)."""
    return f"{value:.6g}" if isinstance(value, float) else value


def inline_images(markdown_html: str, folder: Path) -> str:
    """<img src="plot.png"> of a comparison's own files become data: URIs; anything else is refused."""

    def replace(match: re.Match[str]) -> str:
        source = html.unescape(match.group(1))
        path = (folder / source).resolve()
        if re.match(r"^[a-z]+:", source) or folder.resolve() not in path.parents or not path.is_file():
            return 'src=""'  # nothing is ever fetched
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'src="data:image/{path.suffix.lstrip(".") or "png"};base64,{data}"'

    return re.sub(r'src="([^"]*)"', replace, markdown_html)


def comparison_section(folder: Path) -> str:
    from markdown_it import MarkdownIt

    rendered = MarkdownIt("commonmark", {"html": False}).enable("table").render((folder / "report.md").read_text())
    listed = set(re.findall(r'src="([^"]*)"', rendered))
    extra = [path for path in sorted(folder.glob("*.png")) if path.name not in listed]  # every plot, linked or not
    rendered += "".join(f'<figure><img src="{html.escape(path.name)}" alt="{html.escape(path.stem)}"></figure>' for path in extra)
    return f"<h2>Comparison: {html.escape(folder.name)}</h2>\n" + inline_images(rendered, folder)


def build_report(folders: Sequence[Path]) -> str:
    run_folders: list[Path] = []
    comparisons: list[Path] = []
    for folder in map(Path, folders):
        if (folder / "report.md").is_file() and not (folder / "config.json").is_file():
            comparisons.append(folder)
        else:
            run_folders += find_runs(folder)
    runs = read_runs(run_folders)
    if not runs and not comparisons:
        raise ConfigError(f"no trainkit runs or comparisons in {', '.join(map(str, folders))}; give run or compare folders")
    labels = [run.path.name if [r.path.name for r in runs].count(run.path.name) == 1 else str(run.path) for run in runs]
    body = [f"<h1>trainkit report</h1><p>{time.strftime('%Y-%m-%d %H:%M')}, {len(runs)} runs, {len(comparisons)} comparisons</p>"]
    if runs:
        body.append(runs_section(runs, labels))
    body += [comparison_section(folder) for folder in comparisons]
    return (f"{PAGE_START}<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")  # fmt: skip


def write_report(folders: Sequence[Path], path: Path, *, overwrite: bool = False) -> Path:
    """build_report's page written atomically to ``path``; a path that cannot be written, a run's
    own file (always), or one that holds something else (unless ``overwrite``), is one line."""
    refuse_to_replace(path, overwrite=overwrite)
    page = build_report(folders)
    try:
        write_atomically(path, page)
    except OSError as exc:
        raise TrainkitError(f"cannot write {path}: {exc.strerror or exc}; choose a writable --out") from None
    return path


def refuse_to_replace(path: Path, *, overwrite: bool = False) -> None:
    """A one-line error for an ``--out`` whose writing would destroy something: a run's own file
    (existing or not yet written; ``overwrite`` never lifts this), a folder, or an existing file
    that is no earlier report."""
    run = run_folder_of(path)
    if run is not None:
        raise ConfigError(f"--out {path} is a file of the run folder {run}; write the report elsewhere, "
                          f"e.g. {run / 'report.html'}")  # fmt: skip
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; give the HTML file to write, e.g. {path / 'report.html'}")
    if path.exists() and not overwrite and not is_earlier_report(path):
        raise ConfigError(f"--out {path} exists and is not a trainkit report; choose another --out "
                          f"or add --overwrite to replace it")  # fmt: skip


def is_earlier_report(path: Path) -> bool:
    """Whether ``path`` is a page build_report wrote (it starts with PAGE_START)."""
    try:
        with path.open("rb") as handle:
            return handle.read(len(PAGE_START)) == PAGE_START.encode()
    except OSError:
        return False
