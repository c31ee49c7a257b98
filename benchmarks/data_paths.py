"""What each way of handing data to the Trainer costs per epoch, side by side.

    python benchmarks/data_paths.py [--rounds 5] [--images 20000] [--batch-size 128]

Same MNIST MLP workload as loops.py (one epoch, AdamW, clipping, cosine schedule), rotating
the order of the variants every round; medians, minima and the median of each round's own
ratio (the variants of a round run seconds apart, so the machine's slow drifts cancel). Two comparisons (docs/benchmarks.md
"Data paths"):

1. trainkit on ``DeviceBatches`` (the in-memory fast path) against trainkit on map-style
   in-memory Datasets: a ``TensorDataset`` (picked as DeviceBatches automatically), a Dataset
   with per-sample ``__getitem__`` (DatasetBatches: a DataLoader per epoch, per-batch seeding)
   and the same Dataset with a batched ``__getitems__`` (through ``DatasetBatches(...,
   collate_fn=...)``, which keeps the per-batch seeding);
2. trainkit on a user's ``DataLoader`` against the hand-written loop over the same DataLoader
   (loops.py's loop (b)).

Whole epochs on this shared machine vary by ±10% between identical runs, so a third table
times the loading alone (iterating each path's batches without training) and predicts each
epoch ratio from it: the training step is the same code in every variant.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loops import CLIP_NORM, LR, WEIGHT_DECAY, Workload, dataloader_loop, fresh_model  # noqa: E402

from trainkit.data.dataset import DatasetBatches
from trainkit.data.device import DeviceBatches
from trainkit.data.loader import LoaderBatches  # noqa: E402
from trainkit.config.schema import TrainConfig  # noqa: E402
from trainkit.recipes.images import load_dataset  # noqa: E402
from trainkit.loop.trainer import Trainer  # noqa: E402


class PerSample(Dataset):
    """An in-memory Dataset the way most are written: one sample per __getitem__."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


class Batched(PerSample):
    """The same, plus __getitems__ returning the collated batch: one indexing call per batch
    (used with ``collate_fn=already_collated``)."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.x[index], self.y[index]


def already_collated(batch):
    return batch


def trainkit_on(data_for: callable):
    """A loop (a) variant: the Trainer fitting whatever ``data_for(workload)`` returns."""

    def loop(workload: Workload) -> float:
        config = TrainConfig(batch_size=workload.batch_size, epochs=1, lr=LR, weight_decay=WEIGHT_DECAY,
                             schedule="cosine", clip_norm=CLIP_NORM, patience=0, device="cpu")  # fmt: skip
        history = Trainer(fresh_model(workload), config).fit(data_for(workload))
        return history[-1]["epoch_seconds"]

    return loop


VARIANTS = {
    "device_batches": trainkit_on(lambda w: DeviceBatches(w.x, w.y, w.batch_size, seed=0)),
    "tensor_dataset": trainkit_on(lambda w: TensorDataset(w.x, w.y)),
    "per_sample_dataset": trainkit_on(lambda w: PerSample(w.x, w.y)),
    "batched_dataset": trainkit_on(
        lambda w: DatasetBatches(Batched(w.x, w.y), w.batch_size, collate_fn=already_collated)
    ),
    "trainkit_dataloader": trainkit_on(
        lambda w: DataLoader(TensorDataset(w.x, w.y), batch_size=w.batch_size, shuffle=True)
    ),
    "hand_dataloader": dataloader_loop,
}
# Loading alone (no training step): what each path costs per batch, in a tight loop that
# the machine's noise affects far less than whole epochs.
LOADERS = {
    "device_batches": lambda w: DeviceBatches(w.x, w.y, w.batch_size, seed=0).epoch(1),
    "per_sample_dataset (DatasetBatches)": lambda w: DatasetBatches(PerSample(w.x, w.y), w.batch_size).epoch(1),
    "batched_dataset (DatasetBatches)": lambda w: DatasetBatches(Batched(w.x, w.y), w.batch_size,
                                                                 collate_fn=already_collated).epoch(1),
    "DataLoader via LoaderBatches": lambda w: LoaderBatches(
        DataLoader(TensorDataset(w.x, w.y), batch_size=w.batch_size, shuffle=True)).epoch(1),
    "DataLoader by hand": lambda w: iter(DataLoader(TensorDataset(w.x, w.y), batch_size=w.batch_size, shuffle=True)),
}  # fmt: skip


def loading_microseconds(workload: Workload, rounds: int) -> dict[str, float]:
    """Median per-batch time of iterating one epoch of each loader, rotating their order."""
    names = list(LOADERS)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            started, batches = time.perf_counter(), sum(1 for _ in LOADERS[name](workload))
            times[name].append((time.perf_counter() - started) / batches * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


RATIOS = [
    ("tensor_dataset", "device_batches"),
    ("per_sample_dataset", "device_batches"),
    ("batched_dataset", "device_batches"),
    ("trainkit_dataloader", "hand_dataloader"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1: less exposed to a busy core)")
    parser.add_argument("--data-dir", default=os.environ.get("TRAINKIT_DATA_DIR"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("trainkit").setLevel(logging.ERROR)
    data = load_dataset("mnist", args.data_dir, val_size=5000, seed=0).train
    workload = Workload("mlp", data.x[: args.images], data.y[: args.images], args.batch_size)
    names = list(VARIANTS)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(VARIANTS[name](workload))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.images} MNIST images, MLP, batch {args.batch_size}, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| variant | median s/epoch | min s/epoch |\n| --- | --- | --- |")
    for name in names:
        print(f"| {name} | {medians[name]:.3f} | {min(times[name]):.3f} |")
    print("\n| ratio | by medians | by minima | median of per-round ratios |\n| --- | --- | --- | --- |")
    for slow, fast in RATIOS:
        paired = statistics.median(a / b for a, b in zip(times[slow], times[fast]))
        print(f"| {slow} / {fast} | {medians[slow] / medians[fast]:.3f}x | {min(times[slow]) / min(times[fast]):.3f}x "
              f"| {paired:.3f}x |")
    step = medians["device_batches"] / workload.steps * 1e6
    print(f"\nloading alone, median per batch over {args.rounds} epochs (a training step here: {step:.0f} µs)")
    print("| loader | µs per batch | predicted epoch ratio to device_batches |\n| --- | --- | --- |")
    loading = loading_microseconds(workload, args.rounds)
    for name, micros in loading.items():
        predicted = (step - loading["device_batches"] + micros) / step
        print(f"| {name} | {micros:.0f} | {predicted:.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
