"""Speed benchmarks: trainkit vs hand-written loops vs Lightning, fast paths, the FLOP limit.

    python benchmarks/run.py [--quick] [--data-dir ../shared/datasets] [--out benchmarks/results]

Runs are interleaved (A B C D, B C D A, ...) so that drift on a noisy machine hits every
loop alike; each cell reports the median seconds per epoch with min-max and its ratio to
the hand-written in-memory loop (c) measured in the same rounds. An "epoch" is the 55,000
MNIST training images (the 5,000 validation images held out); where a run trains on a
subset to save time, its seconds are scaled to 55,000 images, and the report says so.
Writes report.md, results.json and loops.png into --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loops import LOOPS, Workload, fresh_model, in_memory_loop, to_format, trainkit_loop  # noqa: E402

from trainkit.recipes.images import load_dataset  # noqa: E402

EPOCH_IMAGES = 55_000


@dataclass
class Case:
    """One row of a table: a loop run on a workload; ``subset`` images are timed, scaled to an epoch."""

    group: str
    name: str
    loop: Callable[[Workload], float]
    workload: Workload
    reference: str = "in_memory"  # the case name in the same group that ratios are taken against

    def seconds_per_epoch(self) -> float:
        return self.loop(self.workload) * EPOCH_IMAGES / len(self.workload.y)


def round_order(cases: list[Case], round_: int) -> list[Case]:
    """Every case once, each group's cases rotated by the round (A B C D, B C D A, ...): the
    first run after a switch of workload pays for allocator growth, and no loop should always
    be the one that pays."""
    groups = list(dict.fromkeys(c.group for c in cases))
    ordered = []
    for group in groups:
        members = [c for c in cases if c.group == group]
        shift = round_ % len(members)
        ordered += members[shift:] + members[:shift]
    return ordered


def run_interleaved(cases: list[Case], repeats: int) -> dict[tuple[str, str], list[float]]:
    """Round r runs every case once (see round_order); returns each case's seconds per round."""
    times: dict[tuple[str, str], list[float]] = {(c.group, c.name): [] for c in cases}
    for round_ in range(repeats):
        for case in round_order(cases, round_):
            seconds = case.seconds_per_epoch()
            times[(case.group, case.name)].append(seconds)
            print(f"  round {round_ + 1}/{repeats}  {case.group:<28} {case.name:<24} {seconds:7.2f} s/epoch", flush=True)
    return times


def summarise(cases: list[Case], times: dict[tuple[str, str], list[float]]) -> list[dict]:
    rows = []
    for case in cases:
        samples = times[(case.group, case.name)]
        reference = statistics.median(times[(case.group, case.reference)])
        median = statistics.median(samples)
        rows.append({
            "group": case.group, "case": case.name, "median_s": median, "min_s": min(samples), "max_s": max(samples),
            "ratio": median / reference, "reference": case.reference, "images_timed": len(case.workload.y),
            "runs": len(samples),
        })  # fmt: skip
    return rows


# ------------------------------------------------------------------ the physical limit
def peak_matmul_gflops(dtype: torch.dtype, size: int = 1024, repeats: int = 20) -> float:
    """Best-of-3 throughput of a square matmul: the most this CPU does with torch."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, (time.perf_counter() - started) / repeats)
    return 2 * size**3 / best / 1e9


def training_flops_per_image(workload: Workload) -> float:
    """FLOPs of one forward + backward, counted by torch's own FlopCounterMode (matmuls and convs)."""
    model = fresh_model(workload)
    inputs = to_format(workload.x[:256], workload.channels_last)
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(inputs), workload.y[:256]).backward()
    return counter.get_total_flops() / 256


# ---------------------------------------------------------------------- the cases
def loop_cases(data, models: dict[str, int], batch_sizes: tuple[int, ...], loops: list[str]) -> list[Case]:
    cases = []
    for model, images in models.items():
        for batch in batch_sizes:
            workload = Workload(model, data.x[:images], data.y[:images], batch, channels_last=model == "cnn")
            group = f"{model} batch {batch}"
            cases += [Case(group, name, LOOPS[name], workload) for name in loops]
    return cases


def fast_path_cases(data, mlp_images: int, cnn_images: int) -> list[Case]:
    """Each fast path on and off; 'on' is the reference, so the ratio is the cost of turning it off."""
    mlp = Workload("mlp", data.x[:mlp_images], data.y[:mlp_images], 512)
    cnn = Workload("cnn", data.x[:cnn_images], data.y[:cnn_images], 128, channels_last=True)

    def pair(group: str, on: tuple[str, Workload], off: tuple[str, Workload], loop=in_memory_loop) -> list[Case]:
        return [Case(group, on[0], loop, on[1], reference=on[0]), Case(group, off[0], loop, off[1], reference=on[0])]

    def opts(workload: Workload, **options) -> Workload:
        return replace(workload, options={**workload.options, **options})

    def config(workload: Workload, **fields) -> Workload:
        return opts(workload, config=fields, epochs=2)  # epoch 2 is timed: compile happens in epoch 1

    return [
        Case("mlp: batches", "in-memory tensor (c)", in_memory_loop, mlp, reference="in-memory tensor (c)"),
        Case("mlp: batches", "DataLoader (b)", LOOPS["dataloader"], mlp, reference="in-memory tensor (c)"),
        *pair("mlp: AdamW", ("foreach", mlp), ("for-loop", opts(mlp, foreach=False))),
        Case("mlp: AdamW", "fused", in_memory_loop, opts(mlp, fused=True, foreach=None), reference="foreach"),
        *pair("mlp: zero_grad", ("set_to_none=True", mlp), ("set_to_none=False", opts(mlp, set_to_none=False))),
        *pair("mlp: metrics", ("on device, read per epoch", mlp), (".item() every step", opts(mlp, item_every_step=True))),
        *pair("mlp: threads", ("2 threads", opts(mlp, threads=2)), ("1 thread", opts(mlp, threads=1))),
        *pair("mlp: precision (trainkit)", ("fp32", config(mlp)), ("bf16 autocast", config(mlp, precision="bf16")),
              loop=trainkit_loop),  # fmt: skip
        *pair("mlp: torch.compile (trainkit)", ("eager", config(mlp)), ("compiled", config(mlp, compile=True)),
              loop=trainkit_loop),  # fmt: skip
        *pair("cnn: memory format (trainkit)", ("channels_last", config(cnn)),
              ("NCHW", config(replace(cnn, channels_last=False))), loop=trainkit_loop),  # fmt: skip
        *pair("cnn: precision (trainkit)", ("fp32", config(cnn)), ("bf16 autocast", config(cnn, precision="bf16")),
              loop=trainkit_loop),  # fmt: skip
    ]


# ----------------------------------------------------------------------- reporting
def markdown(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table; ``columns`` are (title, alignment rule: "---" or "---:" for numbers)."""
    line = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    return "\n".join([line(t for t, _ in columns), line(a for _, a in columns), *map(line, rows)])


def markdown_table(rows: list[dict]) -> str:
    columns = [("workload", "---"), ("loop / setting", "---"), ("s/epoch median", "---:"), ("min-max", "---"),
               ("ratio", "---:"), ("runs", "---:"), ("images timed", "---:")]  # fmt: skip
    return markdown(columns, (
        [r["group"], r["case"], f"{r['median_s']:.2f}", f"{r['min_s']:.2f}-{r['max_s']:.2f}",
         f"{r['ratio']:.2f}x vs {r['reference']}", str(r["runs"]), f"{r['images_timed']:,}"]
        for r in rows
    ))  # fmt: skip


def limit_table(limits: list[dict]) -> str:
    columns = [("workload", "---"), ("GFLOP/epoch (fwd+bwd)", "---:"), ("s/epoch at fp32 peak", "---:"),
               ("at bf16 peak", "---:"), ("in_memory (c)", "---:"), ("trainkit (a)", "---:"),
               ("trainkit / fp32 limit", "---:")]  # fmt: skip
    return markdown(columns, (
        [r["group"], f"{r['gflop_per_epoch']:.1f}", f"{r['limit_fp32_s']:.2f}", f"{r['limit_bf16_s']:.2f}",
         f"{r['in_memory_s']:.2f}", f"{r['trainkit_s']:.2f}", f"{r['trainkit_s'] / r['limit_fp32_s']:.2f}x"]
        for r in limits
    ))  # fmt: skip


def plot_loops(rows: list[dict], path: Path) -> None:
    from trainkit.tracking.plots import plt

    groups = list(dict.fromkeys(r["group"] for r in rows))
    loops = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        cells = [next(r for r in rows if r["group"] == group and r["case"] == loop) for loop in loops]
        medians = [c["median_s"] for c in cells]
        errors = [[m - c["min_s"] for m, c in zip(medians, cells)], [c["max_s"] - m for m, c in zip(medians, cells)]]
        ax.bar(loops, medians, yerr=errors, color=[f"C{i % 10}" for i in range(len(loops))], capsize=3)
        ax.set_title(group, fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    axes[0][0].set_ylabel("seconds / epoch (median, min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_line() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")  # fmt: skip


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="subsets and 2 rounds: a couple of minutes")
    parser.add_argument("--data-dir", default=os.environ.get("TRAINKIT_DATA_DIR"), help="folder holding mnist/")
    parser.add_argument("--out", default="benchmarks/results", help="where report.md, results.json, loops.png go")
    parser.add_argument("--repeats", type=int, help="rounds per table (default 5, --quick 2)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("loops", "fast-paths", "limit"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("trainkit").setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repeats = args.repeats or (2 if args.quick else 5)
    data = load_dataset("mnist", args.data_dir, val_size=5000, seed=0).train
    sizes = {"mlp": 11_000, "cnn": 2_200} if args.quick else {"mlp": EPOCH_IMAGES, "cnn": 11_000}
    started = time.perf_counter()
    results: dict = {"machine": machine_line(), "date": time.strftime("%Y-%m-%d"), "quick": args.quick,
                     "repeats": repeats, "images_timed": sizes}  # fmt: skip
    report = [f"# Speed benchmarks ({'quick' if args.quick else 'full'})", "",
              f"Machine: {results['machine']}. Date: {results['date']}. Rounds: {repeats}.", ""]  # fmt: skip

    if "loops" not in args.skip:
        print("loop comparison (a trainkit, b DataLoader, c in-memory, d Lightning):", flush=True)
        cases = loop_cases(data, sizes, (128, 512), list(LOOPS))
        results["loops"] = summarise(cases, run_interleaved(cases, repeats))
        plot_loops(results["loops"], out / "loops.png")
        report += ["## Seconds per epoch by loop", "", markdown_table(results["loops"]), "", "![loops](loops.png)", ""]
    if "fast-paths" not in args.skip:
        print("fast paths, each on and off:", flush=True)
        cases = fast_path_cases(data, sizes["mlp"], sizes["cnn"])
        results["fast_paths"] = summarise(cases, run_interleaved(cases, max(2, repeats - 2)))
        report += ["## Fast paths (ratio > 1: slower than with the fast path on)", "",
                   markdown_table(results["fast_paths"]), ""]  # fmt: skip
    if "limit" not in args.skip:
        results["limit"] = physical_limit(data, results.get("loops", []))
        report += ["## The physical limit", "", limit_text(results["limit"]), ""]

    results["seconds"] = time.perf_counter() - started
    report.append(f"Total benchmark time: {results['seconds']:.0f} s.")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    return 0


def physical_limit(data, loop_rows: list[dict]) -> dict:
    """Peak matmul throughput and each workload's training FLOPs: the fastest an epoch could be."""
    peak = {"fp32": peak_matmul_gflops(torch.float32), "bf16": peak_matmul_gflops(torch.bfloat16)}
    rows = []
    for row in (r for r in loop_rows if r["case"] == "trainkit"):
        model, batch = row["group"].split(" batch ")
        workload = Workload(model, data.x[:512], data.y[:512], int(batch), channels_last=model == "cnn")
        gflop = training_flops_per_image(workload) * EPOCH_IMAGES / 1e9
        in_memory = next(r for r in loop_rows if r["group"] == row["group"] and r["case"] == "in_memory")
        rows.append({
            "group": row["group"], "gflop_per_epoch": gflop, "limit_fp32_s": gflop / peak["fp32"],
            "limit_bf16_s": gflop / peak["bf16"], "in_memory_s": in_memory["median_s"], "trainkit_s": row["median_s"],
        })  # fmt: skip
    return {"peak_gflops": peak, "rows": rows}


def limit_text(limit: dict) -> str:
    peak = limit["peak_gflops"]
    header = (f"Peak 1024x1024 matmul on this CPU: {peak['fp32']:.0f} GFLOP/s fp32, {peak['bf16']:.0f} GFLOP/s bf16. "
              "Training FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` (forward + backward matmuls "
              "and convolutions; element-wise ops, BatchNorm, dropout and the optimizer are not counted).")  # fmt: skip
    return header + "\n\n" + (limit_table(limit["rows"]) if limit["rows"] else "(run with the loop comparison)")


if __name__ == "__main__":
    raise SystemExit(main())
