"""trainkit (a) against the hand-written in-memory loop (c) alone, many alternating rounds.

    python benchmarks/ab.py --model mlp --batch-size 128 [--rounds 10] [--images 55000]

For the cells of run.py's loop table whose min-max spread is wider than the difference being
measured: two loops only, alternating which goes first each round (a c, c a, ...), each
timed on the same workload; prints the median and min of each and their ratios.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loops import Workload, in_memory_loop, trainkit_loop  # noqa: E402

from trainkit.recipes.images import load_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--images", type=int, default=55_000)
    parser.add_argument("--data-dir", default=os.environ.get("TRAINKIT_DATA_DIR"))
    args = parser.parse_args(argv)
    logging.getLogger("trainkit").setLevel(logging.WARNING)
    data = load_dataset("mnist", args.data_dir, val_size=5000, seed=0).train
    workload = Workload(args.model, data.x[: args.images], data.y[: args.images], args.batch_size,
                        channels_last=args.model == "cnn")  # fmt: skip
    loops = [("trainkit", trainkit_loop), ("in_memory", in_memory_loop)]
    times: dict[str, list[float]] = {name: [] for name, _ in loops}
    for round_ in range(args.rounds):
        for name, loop in loops[round_ % 2 :] + loops[: round_ % 2]:
            times[name].append(loop(workload) * 55_000 / args.images)
    for name, samples in times.items():
        print(f"{name:<10} median {statistics.median(samples):.3f} s/epoch  min {min(samples):.3f}  "
              f"max {max(samples):.3f}  ({args.rounds} runs)")  # fmt: skip
    a, c = times["trainkit"], times["in_memory"]
    print(f"trainkit / in_memory: median {statistics.median(a) / statistics.median(c):.3f}x, "
          f"min {min(a) / min(c):.3f}x  ({args.model}, batch {args.batch_size}, {args.images:,} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
