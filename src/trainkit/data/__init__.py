"""Data for the loop: the ``EpochBatches`` contract and its three implementations (tensors on
the device, a map-style Dataset, the user's DataLoader), picked by ``as_epoch_batches``; the
batch tree helpers (``runtime``: to the device, split, concatenate); and the IDX file reader."""

from trainkit.data.dataset import DatasetBatches, batch_seed
from trainkit.data.device import DeviceBatches, epoch_seed, shift_images
from trainkit.data.epochs import EpochBatches, as_epoch_batches
from trainkit.data.idx import download_file, read_idx
from trainkit.data.loader import LoaderBatches

__all__ = [
    "DatasetBatches", "DeviceBatches", "EpochBatches", "LoaderBatches", "as_epoch_batches", "batch_seed",
    "download_file", "epoch_seed", "read_idx", "shift_images",
]  # fmt: skip
