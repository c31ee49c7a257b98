"""Same seed, same weights on a CPU? Fresh processes of one seeded recipe on a busy machine.

    python benchmarks/cpu_reproducibility.py [--runs 6] [--busy 2] [--out benchmarks/results/cpu_reproducibility.json]

Each run is a fresh `trainkit train` process of the synthetic MLP recipe (3 epochs, seed 0), with
``--busy`` busy-loop processes beside it (a shared machine). The settings below alternate run by
run; each is reported with its distinct ``model_sha256`` values (one means reproducible) and its
median training wall time (the summary's ``wall_seconds``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["--dataset", "synthetic", "--epochs", "3", "--batch-size", "64", "--device", "cpu", "--patience", "0",
          "--checkpoint-every-steps", "20", "--no-plots"]  # fmt: skip
# name -> (environment, extra flags)
SETTINGS: dict[str, tuple[dict[str, str], list[str]]] = {
    "default": ({}, []),
    "mkl-cbwr-strict": ({"MKL_CBWR": "AUTO,STRICT"}, []),  # Intel MKL's conditional numerical reproducibility
    "omp-dynamic-off": ({"OMP_DYNAMIC": "FALSE", "MKL_DYNAMIC": "FALSE"}, []),
    "one-thread": ({}, ["--threads", "1"]),
}


def busy(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


def one_run(setting: tuple[dict[str, str], list[str]], folder: Path) -> dict:
    environment, flags = setting
    env = {**os.environ, **environment, "TRAINKIT_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "trainkit", "train", *RECIPE, *flags, "--out", str(folder)],
                          capture_output=True, text=True, env=env, check=True)  # fmt: skip
    summary = json.loads(done.stdout)
    return {"model_sha256": summary["model_sha256"], "wall_seconds": summary["wall_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6, help="fresh processes per setting")
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes beside each run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_reproducibility.json"))
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(args.runs):
            for name, setting in SETTINGS.items():
                loaders = [multiprocessing.Process(target=busy, args=(600,), daemon=True) for _ in range(args.busy)]
                for loader in loaders:
                    loader.start()
                try:
                    results[name].append(one_run(setting, Path(scratch) / f"{name}-{index}"))
                finally:
                    for loader in loaders:
                        loader.terminate()
    report = {
        "command": " ".join(["python", "benchmarks/cpu_reproducibility.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "busy_processes": args.busy,
        "settings": {name: {"environment": SETTINGS[name][0], "flags": SETTINGS[name][1],
                            "distinct_model_sha256": sorted({run["model_sha256"][:12] for run in runs}),
                            "median_wall_seconds": statistics.median(run["wall_seconds"] for run in runs),
                            "runs": runs} for name, runs in results.items()},  # fmt: skip
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, entry in report["settings"].items():
        print(f"{name:17s} distinct sha {entry['distinct_model_sha256']} median wall {entry['median_wall_seconds']:.2f}s")


if __name__ == "__main__":
    main()
