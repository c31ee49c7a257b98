"""Training curves as PNG files (matplotlib, no display needed).

The one place that picks matplotlib's headless backend: every module that draws imports
``plt`` from here, so a server without a display never tries to open a window.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = {
    "loss.png": ("loss", ("train_loss", "val_loss"), False),
    "accuracy.png": ("accuracy", ("train_accuracy", "val_accuracy"), False),
    "lr.png": ("learning rate (end of epoch)", ("lr",), True),
}


def plot_history(history: list[dict[str, float]], out_dir: str | Path) -> list[Path]:
    """Write loss, accuracy and lr curves over epochs; returns the files written."""
    out_dir = Path(out_dir)
    epochs = [row["epoch"] for row in history]
    written = []
    for filename, (ylabel, keys, log_scale) in CURVES.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            values = [row.get(key) for row in history]
            if all(v is not None for v in values) and values:
                ax.plot(epochs, values, marker="o", markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if log_scale and all(row.get(k, 0) > 0 for row in history for k in keys):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
