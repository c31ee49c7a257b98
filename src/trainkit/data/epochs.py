"""The contract every kind of training data meets (``EpochBatches``), and
``as_epoch_batches``, which picks the implementation for what the user passed.

``EpochBatches`` is what the loop consumes: ``len()`` batches per epoch, the same on every
rank, and ``epoch(n, start_batch)`` yielding epoch ``n``'s batches from ``start_batch`` on.
When ``epoch`` is a pure function of (seed, n), resuming at (epoch, batch) replays exactly
what an uninterrupted run would have seen: that is how trainkit resumes bit-exactly.

The contract (what the trainer reads)
    ``__len__()``
        batches per epoch, the same on every rank (DDP steps must line up).
    ``epoch(n, start_batch=0) -> Iterator[batch]``
        epoch ``n``'s batches from ``start_batch`` on. May end early (a one-shot iterator
        that ran dry); the loop must cope with a short epoch.
    Optional, read with ``getattr``:
    ``exact_resume: bool``
        True when ``epoch(n, start)`` is a pure function of (seed, n) (given the global RNG
        state the trainer restores), so a mid-epoch resume is bit-exact. Absent means False.
    ``global_samples(start_batch, count) -> int``
        samples in those global batches over all ranks (loss weighting under DDP).
    ``state_dict() -> dict`` / ``load_state_dict(dict)``
        loader state that goes into checkpoints: plain data (tensors, ints, dicts, lists)
        that round-trips through ``torch.save`` / ``torch.load(weights_only=True)``. The
        trainer calls ``state_dict()`` when it saves (after some batches of an epoch) and
        ``load_state_dict`` before the first ``epoch()`` call of a resumed run.

Implementations, and which ``as_epoch_batches`` picks for what
    ``DeviceBatches``
        tensors already on the device (``TensorDataset(x, y)``): exact, no workers.
    ``DatasetBatches``
        any map-style Dataset, loaded by trainkit with a fresh DataLoader per epoch: exact,
        including random augmentation in ``__getitem__``, for any ``num_workers``.
    ``LoaderBatches``
        a DataLoader (or any iterable of batches) the user built. A torchdata
        ``StatefulDataLoader`` resumes from its saved state (exact order); any other loader
        resumes by replaying and discarding the epoch's first batches (not exact).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from trainkit.data.dataset import DatasetBatches, check_batch_size, check_num_workers, collate_samples, mismatch
from trainkit.data.device import DeviceBatches
from trainkit.data.loader import LoaderBatches, samplers
from trainkit.data.rngs import is_ndarray, rngs_restored
from trainkit.errors import ConfigError, DataError, first_line

# --------------------------------------------------------------------------------------------
# The contract, and the other kinds of input
# --------------------------------------------------------------------------------------------


@runtime_checkable
class EpochBatches(Protocol):
    """What the training loop consumes: ``len()`` batches per epoch and ``epoch(n, start_batch)``.

    Declared as a Protocol so that any object with these two methods (DeviceBatches, a user's
    own class) is accepted without subclassing. Optional attributes the loop reads with
    ``getattr`` (absent means "no"; see the module docstring for their exact meaning):
    ``exact_resume: bool``, ``global_samples(start_batch, count) -> int``,
    ``state_dict() -> dict`` and ``load_state_dict(state: dict) -> None``.
    """

    def __len__(self) -> int: ...

    def epoch(self, n: int, start_batch: int = 0) -> Iterator[Any]: ...


# --------------------------------------------------------------------------------------------
# One dispatch for everything the trainer accepts
# --------------------------------------------------------------------------------------------

ACCEPTED_DATA = (
    "a torch Dataset",
    "a DataLoader (a torchdata StatefulDataLoader too)",
    "an IterableDataset",
    "an iterable of batches (a list, a generator)",
    "DeviceBatches or another EpochBatches",
)

# iterable, but not data to train on: characters, rows of a tensor, keys of a dict
_NOT_BATCHES: tuple[type, ...] = (str, bytes, bytearray, Tensor, Mapping)


# ------------------------------------------------------- samples checked before training
CHECKED_SAMPLES = 64  # samples from the start of a map-style dataset checked before training (and its last)


def checked_rows(data: Any, what: str, count: int = CHECKED_SAMPLES) -> tuple[Sequence[int], Any] | None:
    """(dataset indices, their batch) for the checks before training, or None when the data
    cannot be read without being consumed (a DataLoader, an iterable). ``what`` starts messages.

    Tensors in memory (DeviceBatches, ``TensorDataset(x, y)``) are checked whole: it is one
    vectorised pass. A map-style dataset gives its first ``count`` samples and its last: a
    ``__len__`` larger than the data fails there, as one line instead of mid-epoch.
    """
    collate = collate_samples
    if isinstance(data, DatasetBatches):
        data, collate = data.dataset, data.collate_fn
    if isinstance(data, DeviceBatches):
        return range(data.num_samples), (data.x, data.y)
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return range(len(data)), tuple(data.tensors)
    if _is_epoch_batches(data) or not _is_map_style(data) or not len(data):
        return None
    size = len(data)
    indices = sorted(set(range(min(size, count))) | {size - 1})
    with rngs_restored():
        samples = [read_sample(data, index, size, what) for index in indices]
    problem = mismatch(samples, lambda i: f"sample {indices[i]}") if collate is collate_samples else None
    if problem is not None:
        raise DataError(f"{what} {problem}")
    try:
        return indices, collate(samples)
    except DataError as exc:
        raise DataError(f"{what} samples: {exc}") from None


def read_sample(dataset: Any, index: int, size: int, what: str) -> Any:
    """``dataset[index]``; an IndexError there means ``__len__`` promises more samples than exist."""
    try:
        return dataset[index]
    except IndexError as exc:
        raise DataError(
            f"{what} sample {index} cannot be read ({first_line(exc)}) although its __len__ says {size}: make "
            f"__len__ return the number of samples"
        ) from None


def _is_epoch_batches(data: Any) -> bool:
    return callable(getattr(data, "epoch", None)) and hasattr(data, "__len__")


def _is_map_style(data: Any) -> bool:
    """A torch Dataset, or a dataset-like object (``__getitem__`` and ``__len__``, e.g. Hugging Face)."""
    if isinstance(data, IterableDataset):
        return False
    if isinstance(data, Dataset):
        return True
    if isinstance(data, (*_NOT_BATCHES, Sequence, Iterator)) or is_ndarray(data):
        return False  # a list/tuple is a list of batches; str, tensors, arrays, dicts are rejected
    return hasattr(data, "__getitem__") and hasattr(data, "__len__")


def _shards_itself(loader: DataLoader) -> bool:
    """True when each rank's loader yields its own part of the data (a DistributedSampler or alike)."""
    if isinstance(loader.dataset, IterableDataset):
        return True  # no sampler to replace: the dataset must shard by rank itself
    return any(
        isinstance(s, torch.utils.data.DistributedSampler) or callable(getattr(s, "set_epoch", None))
        for s in samplers(loader)
    )


def as_epoch_batches(
    data: Any,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
    lockstep: bool = True,
    steps_per_epoch: int | None = None,
) -> EpochBatches:
    """Turn whatever the user passed as data into EpochBatches: the one place that decides.

    * EpochBatches (``epoch`` and ``__len__``, e.g. DeviceBatches): as is.
    * ``TensorDataset(x, y)`` (two tensors, no ``collate_fn``): DeviceBatches, the in-memory
      fast path; other TensorDatasets: DatasetBatches.
    * a DataLoader (StatefulDataLoader too): LoaderBatches; it keeps its own batch size,
      shuffling and workers. Under DDP it must shard itself (DistributedSampler).
    * an IterableDataset: LoaderBatches over ``DataLoader(data, batch_size, ...)``; under DDP
      the dataset must yield a different part on each rank itself.
    * any other map-style dataset: DatasetBatches (trainkit shuffles, shards and loads it).
    * other iterables (a list of batches, a generator): LoaderBatches.
    ``steps_per_epoch`` only applies to LoaderBatches; trainkit's own kinds know their length.
    """
    if _is_epoch_batches(data):
        return data
    shard = dict(rank=rank, world_size=world_size, lockstep=lockstep)
    if isinstance(data, TensorDataset) and len(data.tensors) == 2 and collate_fn is None:
        x, y = data.tensors
        return DeviceBatches(x, y, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, **shard)
    if isinstance(data, DataLoader):
        if world_size > 1 and not _shards_itself(data):
            raise ConfigError(
                f"a {type(data).__name__} without a DistributedSampler gives every one of the {world_size} ranks "
                f"the same batches: pass the Dataset itself (trainkit shards it) or use a DistributedSampler."
            )
        return LoaderBatches(data, steps_per_epoch=steps_per_epoch)
    if isinstance(data, IterableDataset):
        check_batch_size(batch_size)
        check_num_workers(num_workers)
        loader = DataLoader(
            data,
            batch_size=batch_size,
            drop_last=drop_last,
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(seed),  # worker seeds from seed, not the global RNG
        )
        return LoaderBatches(loader, steps_per_epoch=steps_per_epoch)
    if _is_map_style(data):
        return DatasetBatches(
            data, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, collate_fn=collate_fn,
            num_workers=num_workers, pin_memory=pin_memory, **shard,
        )
    if isinstance(data, Iterable) and not isinstance(data, _NOT_BATCHES) and not is_ndarray(data):
        return LoaderBatches(data, steps_per_epoch=steps_per_epoch)
    hint = " (wrap tensors as TensorDataset(x, y))" if isinstance(data, Tensor) or is_ndarray(data) else ""
    raise ConfigError(
        f"cannot train on {type(data).__name__}{hint}: pass {', '.join(ACCEPTED_DATA[:-1])} or {ACCEPTED_DATA[-1]}."
    )
