"""The image recipes' datasets: MNIST, Fashion-MNIST (IDX files, trainkit.data.idx) and synthetic
images; where to find them, downloading, and the seeded splits.

Where the data comes from
    ``find_dataset_dir`` looks, in order, in an explicit ``data_dir`` (``--data-dir``), in
    ``$TRAINKIT_DATA_DIR/<name>/`` and in the cache ``default_cache_dir()/<name>/``; only the
    cache is ever downloaded into. An explicit directory that lacks the files is an error
    rather than a silent download, because the user asked for *that* directory. So is a
    ``$TRAINKIT_DATA_DIR`` that is no folder, holds the files without the ``<name>/`` level, or
    has an incomplete ``<name>/``; one without ``<name>/`` at all leaves the dataset to the cache.

Splits
    The validation split is carved out of the training set with a seeded ``torch.randperm``
    (same seed, same split); the official test set is never touched. Pixels are scaled to
    [0, 1] and normalised with the mean/std of the training portion only, so validation and
    test statistics do not leak into training.

Synthetic data
    ``"synthetic"`` needs no files: 4000 train + 1000 test 1x28x28 images, 10 classes, each a
    fixed smooth class prototype (the same for every seed) plus per-image contrast jitter and
    Gaussian pixel noise drawn from ``seed``. A small MLP reaches well over 90% in a couple of
    epochs, but the noise keeps it from being trivially perfect. Its validation split is
    ``min(val_size, 20% of its 4000 training images)`` so the default ``val_size=5000`` works.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from trainkit.choices import DATASET_NAMES
from trainkit.data.idx import REPLACE_HINT, download_file, read_idx
from trainkit.errors import ConfigError, DataError

NUM_CLASSES = 10


# ---------------------------------------------------------------------------------------------
# Dataset registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file and the official md5 of its bytes."""

    name: str
    md5: str


@dataclass(frozen=True)
class IdxDataset:
    """An MNIST-style dataset: four IDX files served by one or more mirrors."""

    name: str
    mirrors: tuple[str, ...]
    train_images: RemoteFile
    train_labels: RemoteFile
    test_images: RemoteFile
    test_labels: RemoteFile

    @property
    def files(self) -> tuple[RemoteFile, ...]:
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)

    def urls(self, file: RemoteFile) -> list[str]:
        return [mirror.rstrip("/") + "/" + file.name for mirror in self.mirrors]


def _mnist_layout(name: str, mirrors: tuple[str, ...], md5s: tuple[str, str, str, str]) -> IdxDataset:
    names = (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )
    files = [RemoteFile(n, m) for n, m in zip(names, md5s)]
    return IdxDataset(name, mirrors, *files)


IDX_DATASETS: dict[str, IdxDataset] = {
    "mnist": _mnist_layout(
        "mnist",
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        (
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "d53e105ee54ea40749a09fcbcd1e9432",
            "9fb629c4189551a2d022fa330f9573f3",
            "ec29112dd5afa0611ce80d1b7f02629c",
        ),
    ),
    "fashion-mnist": _mnist_layout(
        "fashion-mnist",
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        (
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "25c81989df183df01b3e8a0aad5dffbe",
            "bef4ecab320f06d8554ea6380940ec79",
            "bb300cfdad3c16e7a12a480ee83cd310",
        ),
    ),
}


def _check_dataset_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}.")


def _idx_dataset(name: str) -> IdxDataset:
    _check_dataset_name(name)
    if name not in IDX_DATASETS:
        raise ConfigError(f"dataset {name!r} is generated in memory and has no files to find.")
    return IDX_DATASETS[name]


# ---------------------------------------------------------------------------------------------
# Finding and downloading files
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where downloads go: $TRAINKIT_CACHE_DIR, else $XDG_CACHE_HOME/trainkit, else ~/.cache/trainkit."""
    explicit = os.environ.get("TRAINKIT_CACHE_DIR", "")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg:
        return Path(xdg).expanduser() / "trainkit"
    return Path.home() / ".cache" / "trainkit"


def _local_copy(folder: Path, file: RemoteFile) -> Path | None:
    """The file as stored in ``folder``: compressed under its own name, or decompressed without .gz."""
    for candidate in (folder / file.name, folder / file.name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _missing_files(spec: IdxDataset, folder: Path) -> list[str]:
    return [f.name for f in spec.files if _local_copy(folder, f) is None]


def _placement_hint(spec: IdxDataset) -> str:
    return (
        f"Put {', '.join(f.name for f in spec.files)} (gzip-compressed or not) in "
        f"{default_cache_dir() / spec.name}, or pass --data-dir DIR (a folder holding the files "
        f"or a {spec.name}/ sub-folder), or set TRAINKIT_DATA_DIR to a folder holding {spec.name}/."
    )


def find_dataset_dir(
    name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True
) -> Path:
    """Return the folder holding the dataset's four IDX files, downloading into the cache if needed.

    Order: explicit ``data_dir`` (error if it lacks the files; never downloads),
    ``$TRAINKIT_DATA_DIR/<name>`` (see ``_dataset_dir_in_env``), then ``default_cache_dir()/<name>``.
    Setting ``TRAINKIT_OFFLINE=1`` forbids downloading (tests and CI use it).
    """
    download = download and os.environ.get("TRAINKIT_OFFLINE", "") not in ("1", "true", "yes")
    spec = _idx_dataset(name)
    if data_dir is not None and str(data_dir) != "":
        return _dataset_dir_in_explicit(spec, Path(data_dir).expanduser())
    env_dir = _env_data_dir()
    found = None if env_dir is None else _dataset_dir_in_env(spec, env_dir)
    if found is not None:
        return found
    cache = default_cache_dir() / spec.name
    if not _missing_files(spec, cache):
        return cache
    if not download:
        raise DataError(
            f"{spec.name} files missing from the cache {cache} "
            f"({', '.join(_missing_files(spec, cache))}) and downloading is disabled. "
            f"{_env_dir_note(spec, env_dir)}They can be fetched from: {', '.join(spec.mirrors)}. "
            f"{_placement_hint(spec)}"
        )
    _download_missing(spec, cache, _env_dir_note(spec, env_dir))
    return cache


def _env_data_dir() -> Path | None:
    """$TRAINKIT_DATA_DIR as a path; None when unset or empty."""
    value = os.environ.get("TRAINKIT_DATA_DIR", "")
    return Path(value).expanduser() if value else None


def _dataset_dir_in_env(spec: IdxDataset, env_dir: Path) -> Path | None:
    """``$TRAINKIT_DATA_DIR/<name>`` when it holds the files; None when it has no ``<name>/`` (the cache is next).

    Unlike ``--data-dir``, the files must sit in the ``<name>/`` sub-folder: mnist and fashion-mnist
    share their file names, so files lying directly in TRAINKIT_DATA_DIR could be either. What is
    plainly a mistake is an error rather than a fall-back to the cache (or a silent download): a
    TRAINKIT_DATA_DIR that is no folder, the files one level too high, or a ``<name>/`` lacking some.
    """
    folder = env_dir / spec.name
    where = f"$TRAINKIT_DATA_DIR/{spec.name} ({folder})"
    if not env_dir.is_dir():
        state = "a file" if env_dir.exists() else "missing"
        raise DataError(
            f"TRAINKIT_DATA_DIR={env_dir} is {state}, not a folder, so {where} cannot hold {spec.name}'s "
            f"files. Set TRAINKIT_DATA_DIR to the folder holding {spec.name}/, or unset it to use the cache "
            f"{default_cache_dir() / spec.name}."
        )
    missing = _missing_files(spec, folder)
    if not missing:
        return folder
    if not _missing_files(spec, env_dir):
        raise DataError(f"{where} lacks {spec.name}'s files: {_misplaced_files_fix(spec, env_dir)}")
    if folder.exists():
        raise DataError(f"{where} lacks {', '.join(missing)}. Put all four files there, or unset TRAINKIT_DATA_DIR.")
    return None


def _misplaced_files_fix(spec: IdxDataset, env_dir: Path) -> str:
    """The fix when TRAINKIT_DATA_DIR holds the IDX files itself instead of a ``<name>/`` sub-folder."""
    if env_dir.name == spec.name:
        return f"the files are in {env_dir}; set TRAINKIT_DATA_DIR to its parent {env_dir.parent}."
    return (
        f"{spec.name}'s file names lie directly in {env_dir}; move the files into {env_dir / spec.name}, "
        f"or pass --data-dir {env_dir}."
    )


def _env_dir_note(spec: IdxDataset, env_dir: Path | None) -> str:
    """Where else was looked (a sentence, or nothing): a TRAINKIT_DATA_DIR without the dataset is named."""
    if env_dir is None:
        return ""
    return f"$TRAINKIT_DATA_DIR/{spec.name} ({env_dir / spec.name}) does not exist. "


def _dataset_dir_in_explicit(spec: IdxDataset, data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise DataError(
            f"data directory {data_dir} does not exist (or is not a directory). "
            f"Pass --data-dir a folder holding {spec.name}'s files or a {spec.name}/ sub-folder."
        )
    for candidate in (data_dir, data_dir / spec.name):
        if not _missing_files(spec, candidate):
            return candidate
    raise DataError(
        f"data directory {data_dir} lacks {spec.name}'s files: missing "
        f"{', '.join(_missing_files(spec, data_dir))} (looked in {data_dir} and "
        f"{data_dir / spec.name}). Put the four files in one of those folders, or drop "
        f"--data-dir to use TRAINKIT_DATA_DIR or the download cache."
    )


def _download_missing(spec: IdxDataset, cache: Path, env_note: str) -> None:
    for file in spec.files:
        if _local_copy(cache, file) is not None:
            continue
        try:
            download_file(spec.urls(file), cache / file.name, file.md5)
        except DataError as exc:
            raise DataError(f"could not download {spec.name}: {exc} {env_note}{_placement_hint(spec)}") from None


# ---------------------------------------------------------------------------------------------
# Loading and splitting
# ---------------------------------------------------------------------------------------------


@dataclass
class TensorSplit:
    """One split as two whole tensors: x float32 (N, 1, H, W) normalised, y int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class DatasetSplits:
    """Train/val/test splits plus what a model and a report need to know about them."""

    name: str
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    num_classes: int
    input_shape: tuple[int, ...]
    mean: float
    std: float


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    val_size: int = 5000,
    seed: int = 0,
    download: bool = True,
    device: str | torch.device = "cpu",
) -> DatasetSplits:
    """Load a dataset as normalised tensors on ``device``, with a seeded validation split."""
    _check_dataset_name(name)
    if val_size < 0:
        raise ConfigError(f"val_size must be >= 0, got {val_size}.")
    target = _as_device(device)
    if name == "synthetic":
        train_images, train_labels, test_images, test_labels = _synthetic_images(seed)
        val_size = min(val_size, len(train_labels) // 5)
    else:
        train_images, train_labels, test_images, test_labels = _read_idx_dataset(
            IDX_DATASETS[name], find_dataset_dir(name, data_dir, download=download)
        )
    if val_size >= len(train_labels):
        raise ConfigError(
            f"val_size={val_size} must be smaller than the {len(train_labels)} training images."
        )
    train_idx, val_idx = _split_indices(len(train_labels), val_size, seed)
    train_u8 = train_images[train_idx]
    mean, std = _pixel_mean_std(train_u8)
    splits = [
        _make_split(images, labels, mean, std, target)
        for images, labels in (
            (train_u8, train_labels[train_idx]),
            (train_images[val_idx], train_labels[val_idx]),
            (test_images, test_labels),
        )
    ]
    return DatasetSplits(
        name=name,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=NUM_CLASSES,
        input_shape=(1, *train_images.shape[1:]),
        mean=mean,
        std=std,
    )


def _as_device(device: str | torch.device) -> torch.device:
    try:
        target = torch.device(device)
        torch.empty(0, device=target)  # fails early if the device is not usable here
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ConfigError(f"device {str(device)!r} is not available: {exc}") from None
    return target


def _read_idx_dataset(spec: IdxDataset, folder: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    train = _read_images_and_labels(folder, spec.train_images, spec.train_labels)
    test = _read_images_and_labels(folder, spec.test_images, spec.test_labels)
    if train[0].shape[1:] != test[0].shape[1:]:
        raise DataError(
            f"image size differs between {spec.train_images.name} {tuple(train[0].shape[1:])} and "
            f"{spec.test_images.name} {tuple(test[0].shape[1:])} in {folder}; the files do not "
            f"belong to the same dataset."
        )
    return (*train, *test)


def _read_images_and_labels(
    folder: Path, images_file: RemoteFile, labels_file: RemoteFile
) -> tuple[Tensor, Tensor]:
    images_path = _local_copy(folder, images_file) or folder / images_file.name
    labels_path = _local_copy(folder, labels_file) or folder / labels_file.name
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(
            f"{images_path}: expected a 3-D image file (count, height, width), "
            f"got shape {tuple(images.shape)}."
        )
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected a 1-D label file, got shape {tuple(labels.shape)}.")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; the files do not belong together. Replace both with "
            f"matching copies."
        )
    highest = int(labels.max())
    if highest >= NUM_CLASSES:
        raise DataError(
            f"{labels_path}: label value {highest} found, expected 0..{NUM_CLASSES - 1}. "
            f"{REPLACE_HINT}"
        )
    return images, labels.long()


def _split_indices(n: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded (train, val) index sets; both sorted, so val_size=0 keeps the file's order."""
    generator = torch.Generator().manual_seed(seed)
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[torch.randperm(n, generator=generator)[:val_size]] = True
    return (~is_val).nonzero().squeeze(1), is_val.nonzero().squeeze(1)  # O(n), no sort


def _pixel_mean_std(images_u8: Tensor) -> tuple[float, float]:
    """Mean/std of the pixels scaled to [0, 1], from exact integer sums (no float drift)."""
    flat = images_u8.reshape(-1)
    count = flat.numel()
    histogram = torch.bincount(flat, minlength=256).double()
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    mean = float((histogram * levels).sum() / count)
    var = float((histogram * (levels - mean) ** 2).sum() / count)
    if var <= 0.0:
        raise DataError("the training images are all one colour; they cannot be normalised.")
    return mean, math.sqrt(var)


def _make_split(images_u8: Tensor, labels: Tensor, mean: float, std: float, device: torch.device) -> TensorSplit:
    x = images_u8.to(device).unsqueeze(1).to(torch.float32)
    x.mul_(1.0 / 255.0).sub_(mean).div_(std)
    return TensorSplit(x=x, y=labels.to(device=device, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# Synthetic dataset
# ---------------------------------------------------------------------------------------------

_SYNTHETIC_PROTOTYPE_SEED = 20240601  # fixed: the task is the same for every `seed`
_SYNTHETIC_TRAIN, _SYNTHETIC_TEST, _SYNTHETIC_SIDE = 4000, 1000, 28
_SYNTHETIC_NOISE = 0.3  # std of per-pixel noise, on the [0, 1] pixel scale
_SYNTHETIC_CLASS_SPREAD = 0.3  # how far class patterns stray from a shared base: sets difficulty


def _synthetic_prototypes() -> Tensor:
    """Ten smooth patterns in [0, 1]: a shared base plus a small class-specific deviation.

    Coarse 7x7 noise upsampled bilinearly to 28x28 gives smooth blobs; sharing a base keeps
    the classes close enough that noise makes them confusable (no trivial 100%).
    """
    generator = torch.Generator().manual_seed(_SYNTHETIC_PROTOTYPE_SEED)
    base = torch.randn(1, 1, 7, 7, generator=generator)
    deviation = torch.randn(NUM_CLASSES, 1, 7, 7, generator=generator)
    coarse = base + _SYNTHETIC_CLASS_SPREAD * deviation
    smooth = torch.nn.functional.interpolate(
        coarse, size=(_SYNTHETIC_SIDE, _SYNTHETIC_SIDE), mode="bilinear", align_corners=False
    )
    return torch.sigmoid(1.5 * smooth).squeeze(1)


def _synthetic_images(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """uint8 images and int64 labels, like an IDX dataset, so they share the loading path."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = _synthetic_prototypes()

    def draw(count: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(count) % NUM_CLASSES
        labels = labels[torch.randperm(count, generator=generator)]
        contrast = 0.7 + 0.6 * torch.rand(count, 1, 1, generator=generator)
        noise = _SYNTHETIC_NOISE * torch.randn(count, _SYNTHETIC_SIDE, _SYNTHETIC_SIDE, generator=generator)
        pixels = (0.5 + contrast * (prototypes[labels] - 0.5) + noise).clamp_(0.0, 1.0)
        return (pixels * 255.0).round_().to(torch.uint8), labels

    train_images, train_labels = draw(_SYNTHETIC_TRAIN)
    test_images, test_labels = draw(_SYNTHETIC_TEST)
    return train_images, train_labels, test_images, test_labels
