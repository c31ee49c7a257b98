"""Time to accuracy: wall seconds of a whole training process, data loading included.

    python benchmarks/time_to_accuracy.py [--repeats 3] [--only mlp] [--data-dir ../shared/datasets]

Each entry is a fresh process (Python start, imports, reading MNIST, training, testing on
the official 10,000 test images, writing outputs), timed from outside and run in
interleaved rounds. The three frameworks train the same recipe: the MLP 784-256-128-10 for
four epochs at batch 512 and the CNN 32-64-128 for one epoch at batch 256, one-cycle to lr
0.01, AdamW, clipping at norm 1, bf16 autocast, all 60,000 training images. Lightning's side is
benchmarks/lightning_mnist.py, Keras 3's (torch backend) benchmarks/keras_mnist.py. The
recipes in configs/ (faster or more accurate, with other settings) are benchmarks/recipes.py's.
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Entry:
    name: str
    target: str
    command: list[str]  # "{out}" is replaced by a fresh output directory
    accuracy_from: str  # "summary" (trainkit's summary.json) or "stdout" (a JSON line)


MLP_RECIPE = ["--model", "mlp", "--epochs", "4", "--batch-size", "512", "--lr", "0.01", "--dropout", "0.1"]
CNN_RECIPE = ["--model", "cnn", "--epochs", "1", "--batch-size", "256", "--lr", "0.01", "--dropout", "0.3"]


def recipe_parser(precision_default: str, precisions: tuple[str, ...]) -> argparse.ArgumentParser:
    """The flags the Lightning and Keras scripts share (their defaults: the MLP recipe above)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--precision", default=precision_default, choices=precisions)
    parser.add_argument("--data-dir", default=os.environ.get("TRAINKIT_DATA_DIR"))
    return parser


def entries(data_dir: str) -> list[Entry]:
    py = sys.executable
    trainkit = [py, "-m", "trainkit", "train", "--data-dir", data_dir, "--out", "{out}", "--schedule", "onecycle",
                "--precision", "bf16", "--val-size", "0", "--patience", "0"]  # fmt: skip
    lightning = [py, str(ROOT / "benchmarks" / "lightning_mnist.py"), "--data-dir", data_dir]
    keras = [py, str(ROOT / "benchmarks" / "keras_mnist.py"), "--data-dir", data_dir]
    return [
        Entry("mlp: trainkit", "98%", [*trainkit, *MLP_RECIPE], "summary"),
        Entry("mlp: Lightning", "98%", [*lightning, *MLP_RECIPE], "stdout"),
        Entry("mlp: Keras", "98%", [*keras, *MLP_RECIPE], "stdout"),
        Entry("cnn: trainkit", "99%", [*trainkit, *CNN_RECIPE], "summary"),
        Entry("cnn: Lightning", "99%", [*lightning, *CNN_RECIPE], "stdout"),
        Entry("cnn: Keras", "99%", [*keras, *CNN_RECIPE], "stdout"),
    ]


def run_once(entry: Entry) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [part.replace("{out}", str(out)) for part in entry.command]
        env = {**os.environ, "TQDM_DISABLE": "1"}
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{entry.name} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        if entry.accuracy_from == "summary":
            accuracy = json.loads((out / "summary.json").read_text())["test_accuracy"]
        else:
            accuracy = json.loads(done.stdout.strip().splitlines()[-1])["test_accuracy"]
    return {"wall_s": wall, "test_accuracy": accuracy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", help="run only entries whose name contains this text")
    parser.add_argument("--data-dir", default=os.environ.get("TRAINKIT_DATA_DIR", "../shared/datasets"))
    parser.add_argument("--out", default="benchmarks/results/time_to_accuracy.json")
    args = parser.parse_args(argv)
    chosen = [e for e in entries(args.data_dir) if args.only is None or args.only in e.name]
    runs: dict[str, list[dict]] = {e.name: [] for e in chosen}
    for round_ in range(args.repeats):
        for entry in chosen:
            result = run_once(entry)
            runs[entry.name].append(result)
            print(f"round {round_ + 1}: {entry.name:<40} {result['wall_s']:6.1f} s  "
                  f"test {100 * result['test_accuracy']:.2f}%", flush=True)  # fmt: skip
    print("\n| run | target | wall s median (min-max) | test accuracy (each run) |\n| --- | --- | --- | --- |")
    for entry in chosen:
        walls = [r["wall_s"] for r in runs[entry.name]]
        accuracies = ", ".join(f"{100 * r['test_accuracy']:.2f}%" for r in runs[entry.name])
        print(f"| {entry.name} | {entry.target} | {statistics.median(walls):.1f} ({min(walls):.1f}-{max(walls):.1f}) "
              f"| {accuracies} |")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
