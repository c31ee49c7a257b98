"""What --logger tensorboard,mlflow costs per epoch of the MNIST MLP, against history.csv alone.

    python benchmarks/logging_cost.py [--rounds 3] [--epochs 5] [--data-dir ../shared/datasets]

Each run is `train_run` on MNIST (the default MLP recipe at --log-every-steps 50) in this
process, interleaved with and without the loggers. A callback stamps the end of every epoch;
an epoch's seconds are the gap between two stamps, so they hold the epoch's training and
validation and the previous epoch's writes to the loggers and its checkpoint. The first epoch
is left out (it holds the one-off start: TensorBoard's writer, MLflow's store and run). The
result is the ratio of the medians over epochs 2.. and rounds; the goal (issue 15) is ≤ 1.05x.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from trainkit import TrainConfig
from trainkit.loop.callbacks import Callback, TrainState
from trainkit.recipes.run import train_run

VARIANTS = {"csv": ["csv"], "csv,tensorboard,mlflow": ["csv", "tensorboard", "mlflow"]}


class EpochClock(Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_epoch_end(self, state: TrainState) -> None:
        self.stamps.append(time.perf_counter())


def epoch_seconds(logger: list[str], epochs: int, data_dir: str, folder: Path) -> list[float]:
    clock = EpochClock()
    config = TrainConfig(dataset="mnist", data_dir=data_dir, epochs=epochs, patience=0, logger=logger,
                         out=str(folder / "run"), plots=False)  # fmt: skip
    train_run(config, extra_callbacks=[clock])
    return [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--data-dir", default=os.environ.get("TRAINKIT_DATA_DIR", "../shared/datasets"))
    parser.add_argument("--out", default="benchmarks/results/logging_cost.json")
    args = parser.parse_args(argv)
    logging.getLogger("trainkit").setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_index in range(args.rounds):
        order = list(VARIANTS) if round_index % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            with tempfile.TemporaryDirectory() as tmp:
                measured = epoch_seconds(VARIANTS[name], args.epochs, args.data_dir, Path(tmp))
            seconds[name] += measured
            print(f"round {round_index + 1}: {name:<24} " + " ".join(f"{s:.2f}" for s in measured), flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    ratio = medians["csv,tensorboard,mlflow"] / medians["csv"]
    print(f"\nmedian s/epoch: csv {medians['csv']:.3f}, csv+tensorboard+mlflow {medians['csv,tensorboard,mlflow']:.3f}"
          f" -> {ratio:.3f}x (goal <= 1.05x)")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "seconds": seconds, "medians": medians,
                               "ratio": ratio}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
