"""What the reliability checks at the start of a run cost on MNIST (docs/benchmarks.md).

- the data fingerprint: sha256 of every training and validation tensor (``run.data_fingerprint``),
  against loading the data itself;
- the memory estimate: weights and optimizer state from the model built on the meta device
  (``run.model_memory``), activations from one eval forward of one sample (``memory.activation_bytes_per_sample``);
- taking and releasing the run folder's lock (``rundir.lock_run_folder``).

    .venv/bin/python benchmarks/start_checks.py --data-dir ../shared/datasets   # prints a markdown table
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trainkit.config.schema import TrainConfig
from trainkit.recipes.images import load_dataset
from trainkit.loop.memory import activation_bytes_per_sample
from trainkit.recipes.components import build_model_from_config, data_fingerprint, model_memory
from trainkit.checkpoint.rundir import lock_run_folder, release_run_folder


def median_seconds(work: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times), min(times), max(times)


def memory_estimate(model_name: str, data) -> Callable[[], object]:
    """The two estimates a run makes; the real model is built anyway, so it is built outside the timing."""
    config = TrainConfig(model=model_name).resolved()
    model = build_model_from_config(config, data)
    return lambda: (model_memory(config, data), activation_bytes_per_sample(model, data.train.x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/datasets")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    data = load_dataset("mnist", args.data_dir, val_size=5000, seed=0)
    folder = Path(tempfile.mkdtemp()) / "run"
    cases = {
        "load MNIST (IDX files -> normalised tensors), for scale": lambda: load_dataset("mnist", args.data_dir),
        "data fingerprint (55,000 + 5,000 images and labels)": lambda: data_fingerprint(data),
        "memory estimate, MLP 784-256-128-10": memory_estimate("mlp", data),
        "memory estimate, CNN 32-64-128": memory_estimate("cnn", data),
        "lock + release the run folder": lambda: (lock_run_folder(folder), release_run_folder(folder)),
    }  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} (min–max)\n")
    print("| check | seconds |")
    print("| --- | --- |")
    for name, work in cases.items():
        median, low, high = median_seconds(work, args.repeats)
        print(f"| {name} | {median:.4f} ({low:.4f}–{high:.4f}) |")


if __name__ == "__main__":
    main()
