"""Time to accuracy: wall seconds of a whole training process, data loading included.

    python benchmarks/time_to_accuracy.py [--repeats 3] [--only mlp] [--data-dir ../shared/datasets]

Each entry is a fresh process (Python start, imports, reading MNIST, training, testing on
the official 10,000 test images, writing outputs), timed from outside and run in
interleaved rounds. trainkit's recipes are the config files in configs/; Lightning's is
benchmarks/lightning_mnist.py with the same model, optimizer, schedule and batch size.
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


def entries(data_dir: str) -> list[Entry]:
    py = sys.executable
    trainkit = [py, "-m", "trainkit", "train", "--data-dir", data_dir, "--out", "{out}", "--config"]
    lightning = [py, str(ROOT / "benchmarks" / "lightning_mnist.py"), "--data-dir", data_dir]
    return [
        Entry("mlp: trainkit configs/mlp_fast.toml", "98% in <= 10 s", [*trainkit, "configs/mlp_fast.toml"], "summary"),
        Entry("mlp: Lightning, same recipe", "98%", [*lightning, "--model", "mlp"], "stdout"),
        Entry("cnn: trainkit configs/cnn_fast.toml", "99% in <= 60 s", [*trainkit, "configs/cnn_fast.toml"], "summary"),
        Entry("cnn: Lightning, same recipe", "99%",
              [*lightning, "--model", "cnn", "--epochs", "1", "--batch-size", "256", "--dropout", "0.3"], "stdout"),
        Entry("cnn: trainkit configs/cnn_995.toml", "99.5%", [*trainkit, "configs/cnn_995.toml"], "summary"),
    ]  # fmt: skip


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
