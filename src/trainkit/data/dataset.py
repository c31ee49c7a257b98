"""``DatasetBatches``: any map-style Dataset, loaded by trainkit with a fresh DataLoader per
epoch, each batch fetched under its own seed (exact for any ``num_workers``, including random
augmentation in ``__getitem__``); and the sample checks that collate its first samples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from trainkit.data.device import DeviceBatches, epoch_seed
from trainkit.data.rngs import loop_rng_states, seed_global_rngs, set_loop_rng_states
from trainkit.errors import ConfigError, DataError, first_line


def batch_seed(seed: int, epoch: int, batch: int, rank: int = 0, world_size: int = 1) -> int:
    """The 63-bit seed that global batch ``batch`` of ``epoch`` is fetched under.

    A function of (seed, epoch, batch) alone, so a batch's random augmentation can be replayed
    without the batches before it. Under DDP each rank's slice gets its own seed: otherwise
    every rank would draw the same random numbers for its (different) samples.
    """
    key = f"trainkit:batch:{seed}:{epoch}:{batch}"
    if world_size > 1:
        key += f":{rank}/{world_size}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


class _SeededIndices(list):
    """One batch's dataset indices plus the seed its fetch runs under.

    A list, because torch's fetcher hands the batch sampler's item to ``__getitems__`` as is;
    ``__reduce__`` keeps the seed when it is pickled to a DataLoader worker.
    """

    def __init__(self, indices: Iterable[int], seed: int) -> None:
        super().__init__(indices)
        self.seed = seed

    def __reduce__(self) -> tuple[Any, ...]:
        return (_SeededIndices, (list(self), self.seed))


class _SeededFetch(Dataset):
    """A map-style dataset whose every batch fetch runs under that batch's own seed.

    Seeding per batch, not per worker, makes random augmentation in ``__getitem__`` a function
    of (seed, epoch, batch): the same whether the epoch started at batch 0 or was resumed, and
    whichever worker fetched the batch (workers take batches round-robin, so per-worker RNG
    streams would depend on where the epoch started and on ``num_workers``). torch's
    ``_MapDatasetFetcher`` calls ``__getitems__`` with the batch sampler's item, which carries
    the seed. In the main process the loop's RNG states (torch CPU, ``random``; see loop_rng_states) are
    saved before and restored after each fetch so the training loop's own stream (dropout) is
    untouched (a per-batch cost: see docs/benchmarks.md). A worker process has nothing to
    protect and skips it.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> Any:
        seed = getattr(indices, "seed", None)
        if seed is None:
            return self._fetch(list(indices))
        if torch.utils.data.get_worker_info() is not None:
            seed_global_rngs(seed)
            return self._fetch(list(indices))
        saved = loop_rng_states()
        try:
            seed_global_rngs(seed)
            return self._fetch(list(indices))
        finally:
            set_loop_rng_states(saved)

    def _fetch(self, indices: list[int]) -> Any:
        batched = getattr(self.dataset, "__getitems__", None)
        if callable(batched):
            return batched(indices)  # the dataset's own batched fetch, after seeding
        return [self.dataset[i] for i in indices]


def check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")


def check_num_workers(num_workers: Any) -> None:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers must be an integer >= 0, got {num_workers!r}.")


class _EpochIndexBatches:
    """The batch sampler of one epoch on one rank: this rank's indices of each global batch."""

    def __init__(self, owner: DatasetBatches, order: list[int] | None, epoch: int, start_batch: int) -> None:
        self.owner, self.order, self.epoch = owner, order, epoch
        self.slices: list[tuple[int, int, int]] = []
        bs, total = owner.batch_size, owner.num_samples
        for b in range(start_batch, len(owner)):
            lo, hi = owner.rank_slice(b * bs, min((b + 1) * bs, total))
            if lo < hi:  # an empty slice only happens without lockstep (evaluation): skip it
                self.slices.append((b, lo, hi))

    def __len__(self) -> int:
        return len(self.slices)

    def __iter__(self) -> Iterator[_SeededIndices]:
        o = self.owner
        for b, lo, hi in self.slices:
            indices = range(lo, hi) if self.order is None else self.order[lo:hi]
            yield _SeededIndices(indices, batch_seed(o.seed, self.epoch, b, o.rank, o.world_size))


class DatasetBatches:
    """Batches of any map-style Dataset, loaded by trainkit: resumes bit-exactly, augmentation too.

    Epoch ``n``'s order is ``torch.randperm`` from a generator seeded by ``epoch_seed(seed, n)``
    (``arange`` unshuffled), sharded across ranks exactly like ``DeviceBatches`` (same code).
    Each epoch gets a fresh DataLoader whose batch sampler yields this rank's index lists from
    ``start_batch`` on, so skipped batches are never fetched. The DataLoader's ``generator``
    (the source of its workers' base seed) is seeded from (seed, n), so loading draws nothing
    from the global torch RNG, and every batch is fetched under ``batch_seed(seed, n, b)``
    (torch CPU, ``random`` and numpy): random augmentation in ``__getitem__`` is identical
    whether the epoch starts at 0 or is resumed at batch k, whatever ``num_workers`` is. A
    dataset's own ``__getitems__`` (batched fetch) is used when it has one.

    Caveats: augmentation drawing from a CUDA generator or from a numpy ``Generator`` object
    the dataset owns is not seeded; under DDP the augmentation depends on ``world_size``
    (each rank's slice has its own seed), the order does not.
    """

    exact_resume = True

    # DeviceBatches' own code: it reads batch_size, num_samples, drop_last, lockstep, rank and
    # world_size only, so both classes shard, count and weight batches identically.
    __len__ = DeviceBatches.__len__
    global_samples = DeviceBatches.global_samples
    rank_slice = DeviceBatches.rank_slice

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
        lockstep: bool = True,
    ) -> None:
        if isinstance(dataset, IterableDataset):
            raise ConfigError(
                f"{type(dataset).__name__} is an IterableDataset, which cannot be shuffled or sharded by index: "
                f"pass it to as_epoch_batches, or wrap a DataLoader over it in LoaderBatches."
            )
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise ConfigError(
                f"DatasetBatches needs a map-style Dataset (with __getitem__ and __len__), got "
                f"{type(dataset).__name__}; for a DataLoader or an iterable of batches use LoaderBatches."
            )
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in 0..{world_size - 1}, got {rank}.")
        check_batch_size(batch_size)
        check_num_workers(num_workers)
        if collate_fn is not None and not callable(collate_fn):
            raise ConfigError(f"collate_fn must be callable, got {type(collate_fn).__name__}.")
        num_samples = len(dataset)
        if num_samples == 0:
            raise ConfigError(f"the dataset ({type(dataset).__name__}) is empty: there is nothing to train on.")
        self.dataset = dataset
        self.num_samples = int(num_samples)
        self.batch_size = batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.collate_fn = collate_samples if collate_fn is None else collate_fn
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.rank, self.world_size, self.lockstep = rank, world_size, lockstep
        self._fetch = _SeededFetch(dataset)

    def epoch(self, n: int, start_batch: int = 0) -> Iterator[Any]:
        """Yield epoch ``n``'s batches (this rank's part) from ``start_batch`` on."""
        if not 0 <= start_batch <= len(self):
            raise ConfigError(f"start_batch must be in 0..{len(self)}, got {start_batch}.")
        return self._batches(n, start_batch)

    def _batches(self, n: int, start_batch: int) -> Iterator[Any]:
        order = None
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, n))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        sampler = _EpochIndexBatches(self, order, n, start_batch)
        if not len(sampler):
            return
        loader = DataLoader(
            self._fetch,
            batch_sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # the base seed of the workers (and the one number a DataLoader iterator draws)
            # comes from this generator, not from the global RNG; see dataloader.py
            generator=torch.Generator().manual_seed(epoch_seed(self.seed, n) ^ 0x5EED),
        )
        yield from loader


def describe(sample: Any) -> str:
    """A sample's structure in a few words: 'tuple(Tensor[8], int)'."""
    if isinstance(sample, Tensor):
        return f"Tensor[{', '.join(map(str, sample.shape))}]"
    if isinstance(sample, (tuple, list)):
        return f"{type(sample).__name__}({', '.join(describe(item) for item in sample)})"
    if isinstance(sample, dict):
        return "dict(" + ", ".join(f"{key}: {describe(value)}" for key, value in sample.items()) + ")"
    return type(sample).__name__


def mismatch(samples: Sequence[Any], name: Callable[[int], str]) -> str | None:
    """Which sample differs in structure or shapes from the first one, and the fix; None if none does."""
    shapes = [describe(sample) for sample in samples]
    odd = next((i for i, shape in enumerate(shapes) if shape != shapes[0]), None)
    if odd is None:
        return None
    return (f"{name(odd)} is {shapes[odd]} but {name(0)} is {shapes[0]}: every sample needs the same structure "
            f"and shapes (pad them, or pass a DataLoader with your own collate_fn)")  # fmt: skip


def collate_samples(samples: list[Any]) -> Any:
    """default_collate; samples that cannot be stacked are one DataError naming the odd one out
    (torch's collate error says neither which sample nor what to do)."""
    try:
        return default_collate(samples)
    except (RuntimeError, TypeError) as exc:
        problem = mismatch(samples, lambda i: f"sample {i} of the batch")
        raise DataError(problem or f"its samples cannot be batched ({first_line(exc)})") from None
