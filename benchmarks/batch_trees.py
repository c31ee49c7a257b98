"""What a batch's structure costs per step: moving it to the device and counting its rows.

    python benchmarks/batch_trees.py [--repeats 20000]

Times ``runtime.to_device`` + ``runtime.batch_rows`` + the task's ``split``/``samples`` (what the
loop does to every micro-batch before the forward pass) for an ``(inputs, targets)`` pair of
tensors (the fast path), a dict of three tensors and a nested ``((x1, x2), y)`` tuple, on CPU
tensors of a 128-row MNIST batch. Results: docs/benchmarks.md ("Batch structures").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trainkit.data.runtime import batch_rows, to_device
from trainkit.tasks.kinds import Classification

DEVICE = torch.device("cpu")


def per_call_microseconds(batch, task: Classification, repeats: int) -> float:
    """Median of 5 timings of ``repeats`` calls, in microseconds per call."""
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeats):
            moved = to_device(batch, DEVICE)
            batch_rows(moved)
            task.samples(moved)
            task.split(moved)
        samples.append((time.perf_counter() - started) / repeats * 1e6)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20_000)
    args = parser.parse_args(argv)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    batches = {
        "(inputs, targets)": (x, y),
        "dict of 3 tensors": {"image": x, "mask": x[:, :, :1], "targets": y},
        "((x1, x2), y)": ((x, x[:, :, :1]), y),
    }
    task = Classification()
    print(f"torch {torch.__version__}, {args.repeats} calls x 5")
    print("| batch | µs per micro-batch |\n| --- | --- |")
    for name, batch in batches.items():
        print(f"| {name} | {per_call_microseconds(batch, task, args.repeats):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
