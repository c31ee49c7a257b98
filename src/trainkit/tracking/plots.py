"""Training curves as PNG files (matplotlib, no display needed).

The one place that picks matplotlib's headless backend: every module that draws gets
``pyplot()`` (or ``plt``) from here, so a server without a display never tries to open a
window. Imported on first use: pyplot takes ~0.5 s to import, a tenth of a fast MNIST run,
and every run's curves are drawn on bare ``Figure`` objects, which need neither pyplot nor its
figure manager: 0.7 s instead of 1.2 s for a run's three plots (docs/benchmarks.md, "Recipes").

Every curve drawn here or by ``trainkit report`` goes through ``plot_curve``: at most
``MAX_POINTS`` points (a 200,000-step history made a 149 MB report, one SVG marker per point) and
its label shown literally (a folder named ``a$\\frac{1}$b`` is no mathtext).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAX_POINTS = 2000  # per curve: finer than a plot's pixel columns
MARKER_LIMIT = 200  # a curve of more points is drawn without markers (they would merge into a line)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def agg_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure drawn by the Agg canvas, outside pyplot (nothing to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure


def literal(text: str) -> str:
    """``text`` as matplotlib shows it verbatim: ``$`` escaped, so a user's name (a run folder, a
    metric) is never parsed as mathtext, whose syntax errors abort the whole figure."""
    return text.replace("$", r"\$")


def downsampled(xs: Sequence[float], ys: Sequence[float], limit: int = MAX_POINTS) -> tuple[Any, Any]:
    """At most ``limit`` points of a curve, in order: the first, the last, and each stretch's lowest
    and highest, so spikes and the range survive what a stride would drop."""
    import numpy as np

    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(x) <= limit:
        return x, y
    edges = np.linspace(0, len(y), (limit - 2) // 2 + 1).astype(int)
    kept = {0, len(y) - 1}
    for start, stop in zip(edges[:-1], edges[1:]):
        stretch = y[start:stop]
        kept.update((start + int(np.argmin(stretch)), start + int(np.argmax(stretch))))
    order = sorted(kept)
    return x[order], y[order]


def plot_curve(ax: Any, xs: Sequence[float], ys: Sequence[float], label: str, *fmt: str, markersize: float = 3,
               **style: Any) -> None:  # fmt: skip
    """One curve on ``ax``, downsampled, its label literal; markers only where points are few enough to see."""
    markers = {"marker": "o", "markersize": markersize} if len(xs) <= MARKER_LIMIT else {}
    ax.plot(*downsampled(xs, ys), *fmt, label=literal(label), **markers, **style)


def __getattr__(name: str) -> Any:
    """``from trainkit.tracking.plots import plt`` still works, importing matplotlib only then."""
    if name == "plt":
        return pyplot()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

def curves_of(history: list[dict[str, float]]) -> dict[str, tuple[str, tuple[str, ...], bool]]:
    """One plot per measured quantity: loss, each of the task's metrics (train and val on one
    plot), the lr (log scale). File name -> (y label, history columns, log scale)."""
    names = dict.fromkeys(key.split("_", 1)[1] for row in history for key in row if key.startswith(("train_", "val_")))
    curves = {f"{name}.png": (name.replace("_", " "), (f"train_{name}", f"val_{name}"), False) for name in names}
    curves["lr.png"] = ("learning rate (end of epoch)", ("lr",), True)
    return curves


def plot_history(history: list[dict[str, float]], out_dir: str | Path) -> list[Path]:
    """Write loss, metric and lr curves over the history's rows (epochs, or validation steps); returns the files."""
    out_dir = Path(out_dir)
    by_step = any("step" in row for row in history)
    positions = [row["step"] if by_step else row["epoch"] for row in history]
    written = []
    for filename, (ylabel, keys, log_scale) in curves_of(history).items():
        fig = agg_figure((6, 4))
        ax = fig.subplots()
        for key in keys:
            values = [row.get(key) for row in history]
            if all(v is not None for v in values) and values:
                plot_curve(ax, positions, values, key)
        ax.set_xlabel("optimizer step" if by_step else "epoch")
        ax.set_ylabel(literal(ylabel))
        if log_scale and all(row.get(k, 0) > 0 for row in history for k in keys):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=100)
        written.append(path)
    return written
