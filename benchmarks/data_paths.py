"""What each way of handing data to the Trainer costs per epoch, side by side.

    python benchmarks/data_paths.py [--rounds 5] [--images 20000] [--batch-size 128]

Same MNIST MLP workload as loops.py (one epoch, AdamW, clipping, cosine schedule), alternating
the order of the variants every round, medians reported. Two comparisons (docs/benchmarks.md
"Data paths"):

1. trainkit on ``DeviceBatches`` (the in-memory fast path) against trainkit on map-style
   in-memory Datasets: a ``TensorDataset`` (picked as DeviceBatches automatically), a Dataset
   with per-sample ``__getitem__`` (DatasetBatches: a DataLoader per epoch, per-batch seeding)
   and the same Dataset with a batched ``__getitems__``;
2. trainkit on a user's ``DataLoader`` against the hand-written loop over the same DataLoader
   (loops.py's loop (b)).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loops import CLIP_NORM, LR, WEIGHT_DECAY, Workload, dataloader_loop, fresh_model  # noqa: E402

from trainkit.batches import DeviceBatches  # noqa: E402
from trainkit.config import TrainConfig  # noqa: E402
from trainkit.data import load_dataset  # noqa: E402
from trainkit.trainer import Trainer  # noqa: E402


class PerSample(Dataset):
    """An in-memory Dataset the way most are written: one sample per __getitem__."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


class Batched(PerSample):
    """The same, plus __getitems__: the DataLoader then fetches a whole batch in one call."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.x[index], self.y[index]


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
    "batched_dataset": trainkit_on(lambda w: Batched(w.x, w.y)),
    "trainkit_dataloader": trainkit_on(
        lambda w: DataLoader(TensorDataset(w.x, w.y), batch_size=w.batch_size, shuffle=True)
    ),
    "hand_dataloader": dataloader_loop,
}
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
    parser.add_argument("--data-dir", default=os.environ.get("TRAINKIT_DATA_DIR"))
    args = parser.parse_args(argv)
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
    print(f"{args.images} MNIST images, MLP, batch {args.batch_size}, {args.rounds} rounds, torch {torch.__version__}")
    print("| variant | median s/epoch | min s/epoch |\n| --- | --- | --- |")
    for name in names:
        print(f"| {name} | {medians[name]:.3f} | {min(times[name]):.3f} |")
    print("\n| ratio | median | by minima |\n| --- | --- | --- |")
    for slow, fast in RATIOS:
        print(f"| {slow} / {fast} | {medians[slow] / medians[fast]:.3f}x | {min(times[slow]) / min(times[fast]):.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
