"""A run folder whose history.csv has 200,000 rows (37 MB), for timing `trainkit runs` and
`trainkit report` on it (docs/benchmarks.md, "Reliability, round three").

    python benchmarks/long_history.py BASE_RUN_FOLDER DEST_ROOT   # BASE_RUN_FOLDER: any finished run
"""

from __future__ import annotations

import math
import random
import shutil
import sys
from pathlib import Path

base, root = Path(sys.argv[1]), Path(sys.argv[2])
run = root / "big"
shutil.rmtree(root, ignore_errors=True)
root.mkdir(parents=True)
run.mkdir()
shutil.copy(base / "config.json", run / "config.json")
shutil.copy(base / "summary.json", run / "summary.json")
rng = random.Random(0)
columns = ["epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "grad_norm",
           "clip_fraction", "skipped_steps", "epoch_seconds", "samples_per_second"]
with (run / "history.csv").open("w") as handle:
    handle.write(",".join(columns) + "\n")
    for i in range(1, 200_001):
        loss = 2.3 * math.exp(-i / 40_000) + 0.05 * rng.random()
        handle.write(f"{1 + i // 10_000},{i * 10},{loss!r},{1 - loss / 2.5!r},{loss * 1.1!r},{1 - loss / 2.4!r},"
                     f"{1e-3 * (1 - i / 200_001)!r},{rng.random() * 3!r},{rng.random()!r},0,{rng.random()!r},"
                     f"{1000 + rng.random() * 100!r}\n")
print(run, (run / "history.csv").stat().st_size)
