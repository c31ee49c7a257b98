"""The MNIST recipes in configs/, over seeds: mean ± std of test accuracy and whole-process time.

    python benchmarks/recipes.py [--seeds 0,1,2,3,4] [--only mlp_fast] [--data-dir ../shared/datasets]

Each run is a fresh `trainkit train --config configs/NAME.toml --seed S` process (Python start,
imports, reading MNIST, training, the test, writing outputs), timed from outside; seeds are the
outer loop, so the recipes interleave and share the machine's slow and fast moments. The
goals are issue 14's; the table says which are met.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Goal:
    recipe: str  # configs/<recipe>.toml
    description: str
    accuracy: float  # mean test accuracy to reach
    seconds: float | None  # mean wall seconds allowed (None: the recipe's own budget, see description)
    worst_seed: float | None = None  # no seed may fall below this


GOALS = (
    Goal("mlp_fast", "MLP, fast: >= 98.5% in <= 7 s, no seed below 98.4%", 0.985, 7.0, 0.984),
    Goal("mlp_best", "MLP, best within 5 min: >= 99.0%", 0.990, 300.0),
    Goal("cnn_fast", "CNN, fast: >= 99.0% in <= 10 s", 0.990, 10.0),
    Goal("cnn_995", "CNN, 99.5%: >= 99.5% in <= 45 s", 0.995, 45.0),
    Goal("cnn_best", "CNN, best within 3 min: >= 99.6%", 0.996, 180.0),
)


def run_once(recipe: str, seed: int, data_dir: str, flags: Sequence[str] = ()) -> dict:
    """One whole `trainkit train` process of configs/<recipe>.toml (with extra ``flags``), timed from outside."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "trainkit", "train", "--config", f"configs/{recipe}.toml", "--seed", str(seed),
                   "--data-dir", data_dir, "--out", str(out), *flags]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"}, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{recipe} seed {seed} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        summary = json.loads((out / "summary.json").read_text())
    return {"seed": seed, "wall_s": wall, "test_accuracy": summary["test_accuracy"],
            "test_tta_accuracy": summary.get("test_tta_accuracy")}  # fmt: skip


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """fp32 matmul throughput right now: how fast this (shared) machine is while the table is made."""
    import torch

    a = torch.randn(size, size)
    a @ a
    started = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(runs: dict[str, list[dict]]) -> str:
    lines = ["| recipe | goal | test accuracy, mean ± std (min) | with --tta shifts | wall s, mean ± std | met |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for goal in GOALS:
        results = runs.get(goal.recipe)
        if not results:
            continue
        accuracy, accuracy_std = mean_std([100 * r["test_accuracy"] for r in results])
        worst = min(r["test_accuracy"] for r in results)
        wall, wall_std = mean_std([r["wall_s"] for r in results])
        tta = [100 * r["test_tta_accuracy"] for r in results if r["test_tta_accuracy"] is not None]
        tta_text = "–" if not tta else "{:.2f} ± {:.2f}%".format(*mean_std(tta))
        met = (accuracy / 100 >= goal.accuracy and (goal.seconds is None or wall <= goal.seconds)
               and (goal.worst_seed is None or worst >= goal.worst_seed))  # fmt: skip
        lines.append(f"| `configs/{goal.recipe}.toml` | {goal.description} | {accuracy:.2f} ± {accuracy_std:.2f}% "
                     f"({100 * worst:.2f}%) | {tta_text} | {wall:.1f} ± {wall_std:.1f} | {'yes' if met else 'no'} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--only", help="comma-separated recipe names (default: all with a goal)")
    parser.add_argument("--data-dir", default=os.environ.get("TRAINKIT_DATA_DIR", "../shared/datasets"))
    parser.add_argument("--out", default="benchmarks/results/recipes.json")
    args = parser.parse_args(argv)
    recipes = args.only.split(",") if args.only else [goal.recipe for goal in GOALS]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    runs: dict[str, list[dict]] = {recipe: [] for recipe in recipes}
    speed = [matmul_gflops()]
    for seed in seeds:
        for recipe in recipes:
            result = run_once(recipe, seed, args.data_dir)
            runs[recipe].append(result)
            print(f"seed {seed}: {recipe:<10} {result['wall_s']:6.1f} s  test {100 * result['test_accuracy']:.2f}%", flush=True)
    speed.append(matmul_gflops())
    print(f"\nfp32 matmul before/after: {speed[0]:.0f} / {speed[1]:.0f} GFLOP/s\n" + table(runs))
    merge_results(Path(args.out), runs, speed, key="runs")
    return 0


def merge_results(path: Path, entries: dict, speed: list[float], *, key: str) -> None:
    """Each entry replaces its own part of the results file (the others stay), stamped with the date and the probe."""
    previous = json.loads(path.read_text()) if path.is_file() else {}
    previous.update({name: {"date": time.strftime("%Y-%m-%d"), "matmul_gflops": speed, key: value}
                     for name, value in entries.items()})  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(previous, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
