"""trainkit's loop (a) in this tree against the same loop in another checkout (e.g. main), side by side.

    git worktree add /tmp/base main
    python benchmarks/versions.py --base /tmp/base [--rounds 8] [--images 55000] [--model mlp]

Each round times one epoch of loops.py's ``trainkit_loop`` in a fresh process per tree (its
``src`` first on PYTHONPATH), alternating which tree goes first; prints the medians and the
ratio this/base (also the median of each round's own ratio: the two runs of a round are
seconds apart, so the machine's slow drifts cancel). The epoch is timed inside the loop, so process start and data loading are
excluded. Results: docs/benchmarks.md ("This branch against main").
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
ONE_EPOCH = """
import logging, sys
sys.path.insert(0, {benchmarks!r})
from loops import Workload, trainkit_loop
try:
    from trainkit.recipes.images import load_dataset
except ImportError:  # a tree from before the packages (issue 27)
    from trainkit.data import load_dataset
logging.getLogger("trainkit").setLevel(logging.ERROR)
data = load_dataset("mnist", {data_dir!r}, val_size=5000, seed=0).train
workload = Workload({model!r}, data.x[:{images}], data.y[:{images}], {batch}, channels_last={model!r} == "cnn")
print(trainkit_loop(workload))
"""


def epoch_seconds(tree: Path, args: argparse.Namespace) -> float:
    code = ONE_EPOCH.format(benchmarks=str(tree / "benchmarks"), data_dir=args.data_dir, model=args.model,
                            images=args.images, batch=args.batch_size)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="another checkout of trainkit (e.g. main)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--images", type=int, default=55_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--data-dir", default=os.environ.get("TRAINKIT_DATA_DIR"))
    args = parser.parse_args(argv)
    trees = [("this", HERE), ("base", args.base.resolve())]
    times: dict[str, list[float]] = {name: [] for name, _ in trees}
    for round_ in range(args.rounds):
        for name, tree in trees[round_ % 2 :] + trees[: round_ % 2]:
            times[name].append(epoch_seconds(tree, args))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.model}, batch {args.batch_size}, {args.images} images, {args.rounds} rounds")
    for name, values in times.items():
        print(f"{name}: median {median[name]:.3f} s/epoch, min {min(values):.3f}  ({', '.join(f'{v:.3f}' for v in values)})")
    paired = statistics.median(a / b for a, b in zip(times["this"], times["base"]))
    print(f"this / base: {median['this'] / median['base']:.3f}x by medians, "
          f"{min(times['this']) / min(times['base']):.3f}x by minima, {paired:.3f}x median of the per-round ratios")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
