"""Image classification from a folder of image files, with random augmentation and workers.

What it shows
    * a ~25-line ``ImageFolder`` Dataset (PIL, no torchvision) for the usual layout
      ``root/<class>/<file>.png``, the class names being the sub-folder names;
    * random augmentation (horizontal flip, padded random crop) inside ``__getitem__``, drawn
      from torch's global RNG: trainkit fetches every batch under its own seed, so the
      augmentation is the same for any ``--num-workers`` and a resumed run replays it exactly;
    * passing the Dataset itself to ``Trainer.fit`` (trainkit builds the DataLoader), a small CNN.

With no ``--root`` it first writes a tiny synthetic folder (three classes of 16x16 PNGs:
horizontal stripes, vertical stripes, checkerboards, in random colours, with noise) into a
temporary directory, so it runs offline. Point ``--root`` at your own folder to train on it.

Run (from the repository root)::

    .venv/bin/python examples/image_folder.py
    .venv/bin/python examples/image_folder.py --per-class 40 --epochs 4 --num-workers 2   # quick
    .venv/bin/python examples/image_folder.py --root path/to/folder --size 32

The last line printed is JSON: validation accuracy, chance (1 / classes) and the class names.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from trainkit.config.schema import TrainConfig
from trainkit.tasks.kinds import Classification
from trainkit import Trainer

PATTERNS = ("horizontal", "vertical", "checker")


class ImageFolder(Dataset):
    """``root/<class>/<file>.png`` as (image, class index); images are resized to ``size``."""

    def __init__(self, root: str | Path, *, size: int = 16, augment: bool = False, pad: int = 2) -> None:
        self.classes = sorted(folder.name for folder in Path(root).iterdir() if folder.is_dir())
        self.samples = [(path, label) for label, name in enumerate(self.classes)
                        for path in sorted((Path(root) / name).glob("*.png"))]  # fmt: skip
        if not self.samples:
            raise FileNotFoundError(f"no root/<class>/*.png images under {root}")
        self.size, self.augment, self.pad = size, augment, pad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB").resize((self.size, self.size)), dtype=np.float32)
        x = torch.from_numpy(pixels / 255.0 - 0.5).permute(2, 0, 1)  # (3, H, W), centred
        return (random_flip_and_crop(x, self.pad) if self.augment else x), label


def random_flip_and_crop(image: Tensor, pad: int) -> Tensor:
    """Flip left-right half the time, then crop a random window of the reflect-padded image.
    Uses torch's global RNG, which trainkit seeds per batch (exact under workers and resume)."""
    if torch.rand(()) < 0.5:
        image = image.flip(-1)
    padded = F.pad(image[None], (pad, pad, pad, pad), mode="reflect")[0]
    top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    return padded[:, top : top + image.shape[1], left : left + image.shape[2]]


def pattern_image(pattern: str, size: int, generator: torch.Generator) -> np.ndarray:
    """One noisy two-colour pattern (stripes of random width and phase) as uint8 (size, size, 3)."""
    width = int(torch.randint(2, 5, (), generator=generator))
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    phase = torch.randint(width, (2,), generator=generator)
    rows, cols = rows + phase[0], cols + phase[1]
    on = {"horizontal": rows // width, "vertical": cols // width, "checker": rows // width + cols // width}[pattern] % 2
    background = torch.rand(3, generator=generator)
    foreground = (background + 0.5 + 0.3 * (torch.rand(3, generator=generator) - 0.5)) % 1.0  # keeps contrast
    image = torch.where(on[..., None].bool(), foreground, background)
    image = image + 0.08 * torch.randn(size, size, 3, generator=generator)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def make_demo_folder(path: str | Path, per_class: int = 100, seed: int = 0, size: int = 16) -> Path:
    """Write ``path/<pattern>/<n>.png`` for each of PATTERNS: a dataset that needs no download."""
    generator = torch.Generator().manual_seed(seed)
    for pattern in PATTERNS:
        (Path(path) / pattern).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            Image.fromarray(pattern_image(pattern, size, generator)).save(Path(path) / pattern / f"{n:04d}.png")
    return Path(path)


def split_folder(root: Path, size: int, val_fraction: float, seed: int) -> tuple[Subset, Subset]:
    """Disjoint train / validation subsets: augmented for training, plain for validation."""
    train_view, val_view = ImageFolder(root, size=size, augment=True), ImageFolder(root, size=size)
    order = torch.randperm(len(train_view), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(order) * val_fraction))
    return Subset(train_view, order[n_val:]), Subset(val_view, order[:n_val])


def small_cnn(classes: int, width: int = 16) -> nn.Module:
    """Two conv blocks, global average pooling, a linear head: any image size works."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="folder of <class>/<file>.png (default: a synthetic one)")
    parser.add_argument("--per-class", type=int, default=100, help="images per class of the synthetic folder")
    parser.add_argument("--size", type=int, default=16, help="images are resized to size x size")
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def train_on_folder(root: Path, args: argparse.Namespace) -> dict[str, object]:
    train, val = split_folder(root, args.size, args.val_fraction, args.seed)
    classes = train.dataset.classes
    torch.manual_seed(args.seed)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device="cpu",
                         seed=args.seed, num_workers=args.num_workers)  # fmt: skip
    trainer = Trainer(small_cnn(len(classes)), config, task=Classification())
    trainer.fit(train, val)
    accuracy = trainer.evaluate(val)["accuracy"]
    return {"val_accuracy": accuracy, "chance": 1 / len(classes), "classes": classes,
            "train_images": len(train), "val_images": len(val)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    if args.root is not None:
        result = train_on_folder(Path(args.root), args)
    else:
        with tempfile.TemporaryDirectory(prefix="trainkit-images-") as scratch:
            result = train_on_folder(make_demo_folder(scratch, args.per_class, args.seed, args.size), args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
