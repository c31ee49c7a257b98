"""Where the fast recipes' time goes, and what accuracy each extra second buys (issue 14's frontier).

    python benchmarks/frontier.py [--seeds 0,1,2] [--only startup,mlp_fast,cnn_fast,cnn_995]

"startup" splits a whole `trainkit train --config configs/mlp_fast.toml` process into parts,
each the difference of two fresh processes timed from outside (medians over --rounds):
the interpreter, `import torch`, the `torch._dynamo` import that constructing any
`torch.optim` optimizer triggers, everything of trainkit's but training (the recipe on 2,048
images for 8 steps: reading MNIST, the model, the test, the exports) and the training itself.
The other parts run each recipe with fewer or more epochs (or narrower CNNs) over --seeds:
mean test accuracy against mean wall seconds. Each part's result replaces that part's entry in
benchmarks/results/frontier.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import matmul_gflops, mean_std, merge_results, run_once  # noqa: E402

# recipe -> (label, extra flags); the first variant of the fast ones is the recipe itself.
FRONTIERS = {
    "mlp_fast": [
        ("the recipe (784-512-512, 4 epochs)", []),
        ("1 epoch", ["--epochs", "1"]),
        ("2 epochs", ["--epochs", "2"]),
        ("3 epochs", ["--epochs", "3"]),
        ("6 epochs", ["--epochs", "6"]),
        ("784-256-256, 4 epochs", ["--hidden", "256,256"]),
        ("with dropout 0.1", ["--dropout", "0.1"]),
    ],
    "cnn_fast": [
        ("the recipe (32-64-128, 1 epoch)", []),
        ("8-16-32, 1 epoch", ["--channels", "8,16,32"]),
        ("16-32-64, 1 epoch", ["--channels", "16,32,64"]),
        ("16-32-64, 2 epochs", ["--channels", "16,32,64", "--epochs", "2"]),
    ],
    "cnn_995": [  # the recipe itself (6 epochs, ~2 min a run) is the recipes table's row
        ("3 epochs", ["--epochs", "3"]),
        ("4 epochs", ["--epochs", "4"]),
    ],
}
# name -> code run by `python -c`; each leaves by os._exit, as trainkit does, so no stage pays the
# interpreter's module teardown (~1 s once torch._dynamo is imported) that a trainkit run skips.
PYTHON_STAGES = {
    "interpreter": "import os; os._exit(0)",
    "torch": "import os, torch; os._exit(0)",
    "torch._dynamo": "import os, torch, torch._dynamo; os._exit(0)",
}
FLOOR_FLAGS = ["--train-size", "2048", "--epochs", "2"]  # 8 optimizer steps: everything but the training


def wall_of(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return time.perf_counter() - started


def startup_parts(data_dir: str, rounds: int) -> dict[str, float]:
    """Median seconds of each part of a whole mlp_fast process (interleaved rounds)."""
    walls: dict[str, list[float]] = {name: [] for name in [*PYTHON_STAGES, "floor", "recipe"]}
    for seed in range(rounds):
        for name, code in PYTHON_STAGES.items():
            walls[name].append(wall_of([sys.executable, "-c", code]))
        walls["floor"].append(run_once("mlp_fast", seed, data_dir, FLOOR_FLAGS)["wall_s"])
        walls["recipe"].append(run_once("mlp_fast", seed, data_dir)["wall_s"])
    median = {name: statistics.median(values) for name, values in walls.items()}
    return {
        "Python interpreter start": median["interpreter"],
        "import torch": median["torch"] - median["interpreter"],
        "import torch._dynamo (on the first torch.optim optimizer)": median["torch._dynamo"] - median["torch"],
        "trainkit without training: MNIST, model, test, exports": median["floor"] - median["torch._dynamo"],
        "training (4 epochs, 472 steps)": median["recipe"] - median["floor"],
        "whole process": median["recipe"],
    }


def frontier(recipe: str, seeds: list[int], data_dir: str) -> list[dict]:
    rows = []
    for label, flags in FRONTIERS[recipe]:
        results = [run_once(recipe, seed, data_dir, flags) for seed in seeds]
        accuracy, accuracy_std = mean_std([100 * r["test_accuracy"] for r in results])
        wall, wall_std = mean_std([r["wall_s"] for r in results])
        rows.append({"variant": label, "flags": flags, "accuracy": accuracy, "accuracy_std": accuracy_std,
                     "worst": 100 * min(r["test_accuracy"] for r in results), "wall_s": wall, "wall_std": wall_std})  # fmt: skip
        print(f"{recipe}: {label:<36} {accuracy:.2f} ± {accuracy_std:.2f}%  {wall:5.1f} ± {wall_std:.1f} s", flush=True)
    return rows


def markdown(results: dict) -> str:
    lines = []
    if "startup" in results:
        lines += ["| part of `trainkit train --config configs/mlp_fast.toml` | median s |", "| --- | --- |"]
        lines += [f"| {part} | {seconds:.2f} |" for part, seconds in results["startup"].items()]
    for recipe, rows in results.items():
        if recipe == "startup":
            continue
        lines += ["", f"| `{recipe}` variant | test accuracy, mean ± std (min) | wall s, mean ± std |", "| --- | --- | --- |"]
        lines += [f"| {r['variant']} | {r['accuracy']:.2f} ± {r['accuracy_std']:.2f}% ({r['worst']:.2f}%) | "
                  f"{r['wall_s']:.1f} ± {r['wall_std']:.1f} |" for r in rows]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the startup split")
    parser.add_argument("--only", default=",".join(["startup", *FRONTIERS]))
    parser.add_argument("--data-dir", default=os.environ.get("TRAINKIT_DATA_DIR", "../shared/datasets"))
    parser.add_argument("--out", default="benchmarks/results/frontier.json")
    args = parser.parse_args(argv)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    speed = [matmul_gflops()]
    results: dict = {}
    for part in args.only.split(","):
        results[part] = startup_parts(args.data_dir, args.rounds) if part == "startup" else frontier(part, seeds, args.data_dir)
    speed.append(matmul_gflops())
    print(f"\nfp32 matmul before/after: {speed[0]:.0f} / {speed[1]:.0f} GFLOP/s\n" + markdown(results))
    merge_results(Path(args.out), results, speed, key="results")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
