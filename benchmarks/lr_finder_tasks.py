"""Is the LR finder's suggestion any good? `--lr auto` against the best of a 7-point grid.

    python benchmarks/lr_finder_tasks.py [--only mnist_mlp,text_lstm] [--rules]

For each task, one `trainkit train --lr auto` run and one run per grid lr, all at the same
budget and seed, each a fresh process. The goal (issue 14): `--lr auto` within 0.2 accuracy
points (classification) or 2% of the loss (regression, language models) of the grid's best.
``--rules`` also trains with each of the finder's other suggestions (read from the auto run's
summary), to compare the rules themselves; ``--auto-only`` reruns only `--lr auto` and keeps
the grid (and rules) of the results file, for a change to the finder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # half a decade apart
ACCURACY_TOLERANCE = 0.002  # 0.2 points
LOSS_TOLERANCE = 0.02  # 2%


@dataclass(frozen=True)
class LRTask:
    name: str
    flags: tuple[str, ...]
    metric: str  # a summary.json key
    higher_is_better: bool
    seeds: tuple[int, ...] = (0,)  # each value is the mean over these training seeds


def tasks(data_dir: str) -> tuple[LRTask, ...]:
    text = ("--dataset", "text", "--data-file", str(Path(data_dir) / "text" / "kjv.txt"), "--max-steps", "300")
    return (
        LRTask("mnist_mlp", ("--dataset", "mnist", "--model", "mlp", "--epochs", "3", "--patience", "0"),
               "test_accuracy", True),
        LRTask("mnist_cnn", ("--dataset", "mnist", "--model", "cnn", "--epochs", "1", "--batch-size", "256",
                             "--precision", "bf16", "--patience", "0"), "test_accuracy", True),
        LRTask("text_transformer", text, "val_loss", False),
        LRTask("text_lstm", (*text, "--model", "lstm"), "val_loss", False),
        LRTask("tabular_regression", ("--dataset", "regression_tabular:make_datasets", "--model",
                                      "regression_tabular:make_model", "--task", "regression", "--metrics", "mae,r2",
                                      "--epochs", "60"), "test_loss", False, seeds=(0, 1, 2, 3, 4)),  # fmt: skip
        # early stopping, as the example trains; 88 test rows: a single seed's loss is mostly noise
    )  # fmt: skip


def train(task: LRTask, lr: str, data_dir: str) -> dict:
    """The task's runs at ``lr`` (one per seed); their lr, mean metric and (--lr auto) the
    finder's suggestions (of the first seed: the finder's sweep is seeded too)."""
    runs = [train_once(task, lr, seed, data_dir) for seed in task.seeds]
    values = [run["value"] for run in runs]
    return {**runs[0], "value": math.fsum(values) / len(values), "values": values,
            "diverged": any(run["diverged"] for run in runs)}  # fmt: skip


def train_once(task: LRTask, lr: str, seed: int, data_dir: str) -> dict:
    """One whole run; returns its lr, metric and (for --lr auto) the finder's suggestions."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "trainkit", "train", *task.flags, "--lr", lr, "--data-dir", data_dir,
                   "--out", str(out), "--device", "cpu", "--seed", str(seed)]  # fmt: skip
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT / "examples")}
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode == 3:  # the loss became NaN/inf: this lr diverged
            return {"lr": float(lr), "value": math.nan, "diverged": True}
        if done.returncode != 0:
            raise SystemExit(f"{task.name} --lr {lr} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        summary = json.loads((out / "summary.json").read_text())
        result = {"lr": summary["lr"], "value": summary[task.metric], "diverged": False}
        if lr == "auto":
            result["suggestions"] = summary["lr_finder"]["suggestions"]
        return result


def best_of(results: list[dict], higher_is_better: bool) -> dict:
    finite = [r for r in results if not math.isnan(r["value"])]
    return max(finite, key=lambda r: r["value"]) if higher_is_better else min(finite, key=lambda r: r["value"])


def within_goal(value: float, best: float, higher_is_better: bool) -> bool:
    if math.isnan(value):
        return False
    if higher_is_better:
        return value >= best - ACCURACY_TOLERANCE
    return value <= best * (1 + LOSS_TOLERANCE)


def gap(value: float, best: float, higher_is_better: bool) -> str:
    if math.isnan(value):
        return "diverged"
    if higher_is_better:
        return f"{100 * (value - best):+.2f} points"
    return f"{100 * (value / best - 1):+.1f}%"


def show(value: float, higher_is_better: bool) -> str:
    if math.isnan(value):
        return "diverged"
    return f"{100 * value:.2f}%" if higher_is_better else f"{value:.4f}"


def table(task_list: tuple[LRTask, ...], results: dict[str, dict]) -> str:
    lines = ["| task | metric | grid: lr → value | best of grid | `--lr auto` (lr) | gap | within goal |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for task in task_list:
        if task.name not in results:
            continue
        grid, auto = results[task.name]["grid"], results[task.name]["auto"]
        best = best_of(grid, task.higher_is_better)
        cells = ", ".join(f"{r['lr']:g} → {show(r['value'], task.higher_is_better)}" for r in grid)
        ok = within_goal(auto["value"], best["value"], task.higher_is_better)
        lines.append(f"| {task.name} | {task.metric} | {cells} | {show(best['value'], task.higher_is_better)} "
                     f"(lr {best['lr']:g}) | {show(auto['value'], task.higher_is_better)} ({auto['lr']:.3g}) | "
                     f"{gap(auto['value'], best['value'], task.higher_is_better)} | {'yes' if ok else 'no'} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated task names (default: all)")
    parser.add_argument("--rules", action="store_true", help="also train with the finder's other suggestions")
    parser.add_argument("--auto-only", action="store_true", help="rerun --lr auto only; the grid comes from --out")
    parser.add_argument("--data-dir", default=os.environ.get("TRAINKIT_DATA_DIR", str(ROOT.parent / "shared" / "datasets")))
    parser.add_argument("--out", default="benchmarks/results/lr_finder_tasks.json")
    args = parser.parse_args(argv)
    chosen = [t for t in tasks(args.data_dir) if args.only is None or t.name in args.only.split(",")]
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    results: dict[str, dict] = {}
    for task in chosen:
        auto = train(task, "auto", args.data_dir)
        print(f"{task.name}: --lr auto -> {auto['lr']:.3g}: {auto['value']}", flush=True)
        if args.auto_only:
            results[task.name] = {**previous[task.name], "auto": auto}
            continue
        grid = []
        for lr in GRID:
            grid.append(train(task, repr(lr), args.data_dir))
            print(f"{task.name}: --lr {lr:g}: {grid[-1]['value']}", flush=True)
        rules = {}
        if args.rules:
            for rule, lr in auto["suggestions"].items():
                rules[rule] = {**train(task, repr(lr), args.data_dir), "rule": rule}
                print(f"{task.name}: rule {rule} ({lr:.3g}): {rules[rule]['value']}", flush=True)
        results[task.name] = {"auto": auto, "grid": grid, "rules": rules}
    print("\n" + table(tuple(chosen), results))
    previous.update({name: {"date": time.strftime("%Y-%m-%d"), **found} for name, found in results.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(previous, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
