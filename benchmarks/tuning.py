"""`trainkit tune` on MNIST: TPE with and without pruning against random search, same budget.

    python benchmarks/tuning.py [--trials 20] [--epochs 4] [--data-dir ../shared/datasets] [--quick]

Each study is one `trainkit tune` command (as a user runs it) on the default MLP over lr, weight
decay, dropout and batch size (SPACE below), run one after another on the same machine; a last one
repeats TPE + median pruning with --workers 2 (one thread each). Reported per study: the best
validation accuracy, the test accuracy of the best trial's run, the whole command's wall time,
the epochs trained over all trials, and the trials pruned with the epoch each was pruned at.
Results: benchmarks/results/tuning.json and docs/tuning.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SPACE = textwrap.dedent("""
    [lr]
    low = 1e-4
    high = 3e-2
    log = true

    [weight_decay]
    low = 1e-5
    high = 0.3
    log = true

    [dropout]
    low = 0.0
    high = 0.5

    [batch_size]
    choices = [64, 128, 256, 512]
""")
# name -> the tune flags that differ
STUDIES = {
    "tpe+median": ["--sampler", "tpe", "--pruner", "median"],
    "tpe": ["--sampler", "tpe", "--pruner", "none"],
    "random": ["--sampler", "random", "--pruner", "none"],
    "tpe+median/2workers": ["--sampler", "tpe", "--pruner", "median", "--workers", "2"],
}


def run_study(name: str, flags: list[str], args: argparse.Namespace, folder: Path) -> dict:
    space = folder / "space.toml"
    space.write_text(SPACE)
    command = [sys.executable, "-m", "trainkit", "tune", "--dataset", args.dataset, "--epochs", str(args.epochs),
               "--space", str(space), "--trials", str(args.trials), "--out", str(folder / "study"), *flags,
               *(["--data-dir", args.data_dir] if args.data_dir else []),
               *(["--train-size", "2000", "--val-size", "500"] if args.quick else [])]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{name}: trainkit tune failed ({result.returncode}): {result.stderr.strip().splitlines()[-1]}")
    outcome = json.loads(result.stdout)
    best_summary = json.loads((Path(outcome["best_run"]) / "summary.json").read_text())
    runs = sorted((folder / "study" / "trials").iterdir())
    records = [json.loads((run / "trial.json").read_text()) for run in runs]
    epochs = [json.loads((run / "summary.json").read_text())["epochs_run"] for run in runs]
    return {"study": name, "flags": " ".join(flags), "best_val_accuracy": outcome["best_value"],
            "best_test_accuracy": best_summary.get("test_accuracy"), "best_params": outcome["best_params"],
            "wall_seconds": round(seconds, 1), "epochs_trained": sum(epochs),
            "pruned_at_epochs": [r["pruned_at"] for r in records if r["state"] == "pruned"],
            **{f"trials_{k}": v for k, v in outcome["trials"].items()}}  # fmt: skip


def markdown_table(rows: list[dict]) -> str:
    lines = ["| study | best val accuracy | its test accuracy | wall time | epochs trained | pruned (at epoch) | best lr, weight decay, dropout, batch |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in rows:
        params = row["best_params"]
        best = (f"{params['lr']:.3g}, {params['weight_decay']:.3g}, {params['dropout']:.2f}, {params['batch_size']}")
        lines.append(f"| {row['study']} | {row['best_val_accuracy']:.4f} | {row['best_test_accuracy']:.4f} | "
                     f"{row['wall_seconds']:.0f} s | {row['epochs_trained']} | {row['trials_pruned']} "
                     f"({', '.join(map(str, row['pruned_at_epochs'])) or '-'}) | {best} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-dir", default=os.environ.get("TRAINKIT_DATA_DIR"))
    parser.add_argument("--quick", action="store_true", help="2000 training images, for a smoke run")
    parser.add_argument("--studies", default=",".join(STUDIES), help="comma separated names of STUDIES")
    parser.add_argument("--out", default="benchmarks/results/tuning.json")
    args = parser.parse_args(argv)
    rows = []
    for name in args.studies.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run_study(name, STUDIES[name], args, Path(tmp)))
        print(json.dumps(rows[-1]), flush=True)
    record = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "trials": args.trials,
              "epochs": args.epochs, "dataset": args.dataset, "space": SPACE, "studies": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
