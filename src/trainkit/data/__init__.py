"""Data for the loop: the ``EpochBatches`` contract and its three implementations (tensors on
the device, a map-style Dataset, the user's DataLoader), picked by ``as_epoch_batches``; the
batch tree helpers (``runtime``: to the device, split, concatenate); the global random streams around a fetch
(``rngs``); and the IDX file reader (``idx``, imported on its own)."""

from trainkit.data.dataset import DatasetBatches, batch_seed
from trainkit.data.device import DeviceBatches, epoch_seed, shift_images
from trainkit.data.epochs import EpochBatches, as_epoch_batches
from trainkit.data.loader import LoaderBatches

__all__ = [
    "DatasetBatches", "DeviceBatches", "EpochBatches", "LoaderBatches", "as_epoch_batches", "batch_seed",
    "epoch_seed", "shift_images",
]  # fmt: skip
