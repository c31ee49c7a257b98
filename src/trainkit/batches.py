"""Batches for the training loop: one contract for every kind of data.

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

``DeviceBatches`` slices mini-batches out of tensors that already live on the device (no
DataLoader workers, no per-sample Python). Each epoch's order comes from a generator seeded
by (seed, epoch) alone.

Sharding across data-parallel ranks
    With ``rank``/``world_size`` (``--strategy ddp``), ``batch_size`` is the *global* batch and
    every rank computes the same (seed, epoch) permutation, then takes its own contiguous
    slice of each global batch: ranks are disjoint, together they cover the epoch, and
    optimizer step k sees exactly the samples of the single-process run's step k. A short last
    global batch is split as evenly as possible (sizes differ by at most one); the trainer
    weights each rank's loss by its share (``global_samples``), so DDP's gradient average equals
    the single-process mean. A ``lockstep`` loader (training: every batch is a DDP step that
    all ranks must join) drops a last global batch with fewer samples than ranks (at most
    ``world_size - 1`` samples an epoch); evaluation loaders (``lockstep=False``) keep every
    sample and a rank whose slice is empty just skips that batch. ``DatasetBatches`` shards
    exactly like ``DeviceBatches`` (it shares its code).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

from trainkit.errors import CheckpointError, ConfigError, DataError, first_line

try:  # numpy's global RNG is seeded/restored around batch fetches when numpy is there
    import numpy as _np
except ImportError:  # pragma: no cover - torch works without numpy
    _np = None

log = logging.getLogger("trainkit")


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch), so any epoch can be replayed alone."""
    digest = hashlib.blake2b(f"trainkit:{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def rank_slice(lo: int, hi: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's part of the global batch [lo, hi): contiguous, sizes differing by at most one."""
    base, extra = divmod(hi - lo, world_size)
    start = lo + rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class DeviceBatches:
    """Mini-batches drawn from tensors that already live on the target device.

    Indexing whole device tensors per batch avoids DataLoader workers and host-device copies;
    per-epoch generators make the order a pure function of (seed, epoch), so a run resumed at
    (epoch, start_batch) sees exactly the batches an uninterrupted run would have.
    """

    exact_resume = True  # epoch(n, start) is a pure function of (seed, n)

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        augment_shift: int = 0,
        fill: float | None = None,
        rank: int = 0,
        world_size: int = 1,
        lockstep: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in 0..{world_size - 1}, got {rank}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if x.shape[0] != y.shape[0]:
            raise ConfigError(f"x has {x.shape[0]} samples but y has {y.shape[0]}; they must match.")
        if x.device != y.device:
            raise ConfigError(f"x is on {x.device} but y is on {y.device}; put both on one device.")
        if augment_shift < 0:
            raise ConfigError(f"augment_shift must be >= 0, got {augment_shift}.")
        if augment_shift and x.ndim < 3:
            raise ConfigError(
                f"augment_shift needs images shaped (N, ..., H, W); got x of shape {tuple(x.shape)}."
            )
        if augment_shift and augment_shift >= min(x.shape[-2:]):
            raise ConfigError(
                f"--augment {augment_shift} must be smaller than the {x.shape[-2]}x{x.shape[-1]} images: "
                f"a larger shift moves every pixel out of the picture."
            )
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.augment_shift = augment_shift
        self.rank, self.world_size, self.lockstep = rank, world_size, lockstep
        # default fill: the darkest value, i.e. the (normalised) background of MNIST-like images
        if fill is None and augment_shift and x.numel():
            fill = float(x.min())
        self.fill = 0.0 if fill is None else float(fill)

    def __len__(self) -> int:
        """(Global) batches per epoch: the same on every rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        batches = -(-self.num_samples // self.batch_size)
        if self.lockstep and 0 < self.num_samples % self.batch_size < self.world_size:
            return batches - 1  # every rank must get a sample of every lockstep batch
        return batches

    def global_samples(self, start_batch: int, count: int) -> int:
        """Samples in global batches ``start_batch .. start_batch + count - 1``, over all ranks."""
        lo = start_batch * self.batch_size
        return max(0, min((start_batch + count) * self.batch_size, self.num_samples) - lo)

    def rank_slice(self, lo: int, hi: int) -> tuple[int, int]:
        return rank_slice(lo, hi, self.rank, self.world_size)

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield epoch ``epoch``'s batches from ``start_batch`` on; skipped batches cost nothing."""
        if not 0 <= start_batch <= len(self):
            raise ConfigError(f"start_batch must be in 0..{len(self)}, got {start_batch}.")
        generator = None
        if self.shuffle or self.augment_shift:
            generator = torch.Generator(device=self.x.device).manual_seed(epoch_seed(self.seed, epoch))
        order = self._order(generator)
        offsets = self._shift_offsets(generator)  # drawn for the whole epoch: skipping stays exact
        return self._batches(order, offsets, start_batch)

    def _order(self, generator: torch.Generator | None) -> Tensor | None:
        if not self.shuffle:
            return None
        return torch.randperm(self.num_samples, generator=generator, device=self.x.device)

    def _shift_offsets(self, generator: torch.Generator | None) -> Tensor | None:
        s = self.augment_shift
        if not s:
            return None
        return torch.randint(-s, s + 1, (self.num_samples, 2), generator=generator, device=self.x.device)

    def _batches(
        self, order: Tensor | None, offsets: Tensor | None, start_batch: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        for b in range(start_batch, len(self)):
            lo, hi = self.rank_slice(b * self.batch_size, min((b + 1) * self.batch_size, self.num_samples))
            if lo == hi:
                continue  # evaluation only: fewer samples than ranks in the last batch
            if order is None:
                xb, yb = self.x[lo:hi], self.y[lo:hi]
            else:
                idx = order[lo:hi]
                xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            if offsets is not None:
                xb = shift_images(xb, offsets[lo:hi], self.augment_shift, self.fill)
            yield xb, yb


def shift_images(images: Tensor, offsets: Tensor, max_shift: int, fill: float) -> Tensor:
    """Translate each image by its own (dy, dx) in ``offsets`` (B, 2), filling uncovered pixels.

    Vectorised: pad once, then gather every sample's window with broadcast index tensors.
    Content at (r, c) moves to (r + dy, c + dx). ``max_shift`` must bound ``|offsets|``.
    """
    height, width = images.shape[-2:]
    batch, s = images.shape[0], max_shift
    flat = images.reshape(batch, -1, height, width)
    padded = flat.new_full((batch, flat.shape[1], height + 2 * s, width + 2 * s), fill)
    padded[:, :, s : s + height, s : s + width] = flat
    device = images.device
    rows = torch.arange(height, device=device) + s - offsets[:, 0:1]  # (B, H)
    cols = torch.arange(width, device=device) + s - offsets[:, 1:2]  # (B, W)
    out = padded[
        torch.arange(batch, device=device)[:, None, None, None],
        torch.arange(flat.shape[1], device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    return out.reshape(images.shape)


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


def _seed_global_rngs(seed: int) -> None:
    # The CPU generator only: torch.manual_seed would also reseed every CUDA device's generator.
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    if _np is not None:
        _np.random.seed([seed & 0xFFFFFFFF, seed >> 32])


def _loop_rng_states() -> tuple[Any, Any]:
    """The RNGs the training loop draws from (dropout, the user's Python code): torch CPU and
    ``random``. NumPy's global state is not saved: it costs ~95 µs a batch (docs/benchmarks.md,
    "Data paths") and the loop never draws from it; after a main-process fetch it is the
    batch's seeded stream, a function of (seed, epoch, batch), so a resume stays exact."""
    return torch.get_rng_state(), random.getstate()


def _set_loop_rng_states(states: tuple[Any, Any]) -> None:
    torch.set_rng_state(states[0])
    random.setstate(states[1])


class _SeededFetch(Dataset):
    """A map-style dataset whose every batch fetch runs under that batch's own seed.

    Seeding per batch, not per worker, makes random augmentation in ``__getitem__`` a function
    of (seed, epoch, batch): the same whether the epoch started at batch 0 or was resumed, and
    whichever worker fetched the batch (workers take batches round-robin, so per-worker RNG
    streams would depend on where the epoch started and on ``num_workers``). torch's
    ``_MapDatasetFetcher`` calls ``__getitems__`` with the batch sampler's item, which carries
    the seed. In the main process the loop's RNG states (torch CPU, ``random``; see _loop_rng_states) are
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
            _seed_global_rngs(seed)
            return self._fetch(list(indices))
        saved = _loop_rng_states()
        try:
            _seed_global_rngs(seed)
            return self._fetch(list(indices))
        finally:
            _set_loop_rng_states(saved)

    def _fetch(self, indices: list[int]) -> Any:
        batched = getattr(self.dataset, "__getitems__", None)
        if callable(batched):
            return batched(indices)  # the dataset's own batched fetch, after seeding
        return [self.dataset[i] for i in indices]


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")


def _check_num_workers(num_workers: Any) -> None:
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
        _check_batch_size(batch_size)
        _check_num_workers(num_workers)
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


def _is_stateful_loader(loader: Any) -> bool:
    """A torchdata StatefulDataLoader (or another DataLoader subclass that saves its position)."""
    if (
        isinstance(loader, DataLoader)
        and callable(getattr(loader, "state_dict", None))
        and callable(getattr(loader, "load_state_dict", None))
    ):
        return True
    module = sys.modules.get("torchdata.stateful_dataloader")  # never import torchdata ourselves
    return module is not None and isinstance(loader, module.StatefulDataLoader)


def _samplers(loader: Any) -> list[Any]:
    """The loader's sampler and its batch sampler's sampler, without duplicates."""
    found: list[Any] = []
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if sampler is not None and all(sampler is not s for s in found):
            found.append(sampler)
    return found


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The torch Generators a loader and its samplers draw from, without duplicates, in a fixed order."""
    found: list[torch.Generator] = []
    for owner in (loader, *_samplers(loader)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


class LoaderBatches:
    """A DataLoader, or any iterable of batches, that the user built.

    ``len()`` is ``steps_per_epoch`` when given, else ``len(loader)``; each epoch stops after
    ``len()`` batches even when the loader is longer. A sampler with ``set_epoch``
    (DistributedSampler) is told the epoch before each pass. A one-shot iterator (a
    generator: ``iter(it) is it``) is not restarted: each epoch takes its next ``len()``
    batches and ends early when it runs dry.

    Resuming mid-epoch (``epoch(n, k)`` with k > 0):

    * a torchdata ``StatefulDataLoader``: the trainer saves ``state_dict()`` in the checkpoint
      and calls ``load_state_dict`` on resume; the next ``epoch()`` loads that state into the
      loader and yields exactly the remaining batches (no replay). ``exact_resume`` is True
      with ``num_workers=0``. With workers the order is still exact but ``exact_resume`` is
      False: torchdata restarts the workers' RNG from their base seed, so random augmentation
      in ``__getitem__`` differs from the uninterrupted run (torchdata 0.11; a Stateful
      dataset could save its own RNG). Use ``DatasetBatches`` for exact augmentation.
    * any other loader: the first k batches are fetched again and discarded (a warning says
      so once); shuffling and augmentation then draw new random numbers, so it is not exact.
    """

    def __init__(self, loader: Iterable[Any], *, steps_per_epoch: int | None = None) -> None:
        if not isinstance(loader, Iterable):
            raise ConfigError(f"LoaderBatches needs an iterable of batches, got {type(loader).__name__}.")
        if steps_per_epoch is not None and (
            isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0
        ):
            raise ConfigError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}.")
        self.loader = loader
        self.steps_per_epoch = steps_per_epoch
        self.stateful = _is_stateful_loader(loader)
        self.one_shot = isinstance(loader, Iterator)
        self.exact_resume: bool = self.stateful and getattr(loader, "num_workers", 0) == 0
        self._pending: dict[str, Any] | None = None
        # where the loader's current pass stands: saved with its state so a resume can tell
        # "k batches into epoch n" from "epoch n done, start the next one fresh"
        self._epoch: int | None = None
        self._batches = 0
        self._done = False
        self._warned_replay = False
        self._warned_workers = False

    def __len__(self) -> int:
        """Batches per epoch: ``steps_per_epoch``, else the loader's length."""
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        try:
            return len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            raise ConfigError(
                f"the {type(self.loader).__name__} has no length: give max_steps / steps_per_epoch "
                f"so trainkit knows how long an epoch is."
            ) from None

    def _cap(self) -> int | None:
        try:
            return len(self)
        except ConfigError:
            return None  # no length: an epoch is one pass, however long it is

    def epoch(self, n: int, start_batch: int = 0) -> Iterator[Any]:
        """Yield epoch ``n``'s batches from ``start_batch`` on (see the class docstring for how)."""
        cap = self._cap()
        if isinstance(start_batch, bool) or not isinstance(start_batch, int) or start_batch < 0 or (
            cap is not None and start_batch > cap
        ):
            limit = "" if cap is None else f" and <= {cap}"
            raise ConfigError(f"start_batch must be an integer >= 0{limit}, got {start_batch!r}.")
        return self._iterate(n, start_batch, cap)

    def _iterate(self, n: int, start_batch: int, cap: int | None) -> Iterator[Any]:
        for sampler in _samplers(self.loader):
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(n)
        pending, self._pending = self._pending, None
        self._epoch, self._batches, self._done = n, start_batch, False
        it = None if pending is None else self._restore(pending, n, start_batch)
        if it is None:
            it = self.loader if self.one_shot else iter(self.loader)
            if start_batch:
                self._warn_replay(start_batch)
                if sum(1 for _ in itertools.islice(it, start_batch)) < start_batch:
                    self._done = True  # ran dry while replaying
                    return
        if cap is not None:
            it = itertools.islice(it, cap - start_batch)  # never asks the loader for one more
        for batch in it:
            self._batches += 1
            self._done = self._batches == cap
            yield batch
        self._done = True

    def _restore(self, pending: dict[str, Any], n: int, start_batch: int) -> Iterator[Any] | None:
        """Load the saved state into the loader; its iterator, or None to start epoch n fresh."""
        saved_epoch, saved_batches, done = pending["epoch"], pending["batches"], pending["done"]
        at_saved_position = saved_batches == start_batch and saved_epoch in (None, n)
        if not (at_saved_position or (done and start_batch == 0)):
            raise CheckpointError(
                f"the checkpoint's loader state is {saved_batches} batches into epoch {saved_epoch}, "
                f"but the run resumes at batch {start_batch} of epoch {n}: they must agree."
            )
        self.loader.load_state_dict(pending["loader"])  # type: ignore[attr-defined]
        # The uninterrupted run drew this iterator's one global-RNG number (a DataLoader's base
        # seed, when it has no generator) before the checkpoint: do not draw it a second time.
        rng = torch.get_rng_state()
        try:
            it = iter(self.loader)
        finally:
            torch.set_rng_state(rng)
        # torchdata 0.11 restores a sampler's generator to the state before the epoch's
        # permutation and re-draws it, but not the base-seed draw that follows from a shared
        # loader generator; put every generator back to where it was when the state was saved.
        generators = _loader_generators(self.loader)
        if len(generators) == len(pending["generators"]):
            for generator, state in zip(generators, pending["generators"]):
                generator.set_state(state)
        if done and not at_saved_position:
            return None  # the saved pass was complete: epoch n starts a fresh pass
        if done:
            return iter(())  # resumed exactly at the end of epoch n
        if start_batch and getattr(self.loader, "num_workers", 0) > 0 and not self._warned_workers:
            self._warned_workers = True
            log.warning(
                "resumed %s with %d workers from its saved state: the batch order is exact, but the workers "
                "restart their random streams, so random augmentation in __getitem__ differs from the "
                "uninterrupted run; pass the Dataset itself to trainkit for an exact resume.",
                type(self.loader).__name__, self.loader.num_workers,  # type: ignore[attr-defined]
            )
        return it

    def _warn_replay(self, start_batch: int) -> None:
        if self._warned_replay:
            return
        self._warned_replay = True
        log.warning(
            "resuming mid-epoch over a %s replays and discards its first %d batches: not bit-exact "
            "(shuffling and augmentation draw new random numbers). For an exact resume pass the Dataset "
            "itself to trainkit, or use a torchdata StatefulDataLoader.",
            type(self.loader).__name__, start_batch,
        )

    def state_dict(self) -> dict[str, Any]:
        """The loader's position for a checkpoint: empty unless it is a StatefulDataLoader.

        ``loader`` is the StatefulDataLoader's own ``state_dict()`` taken now (it loads with
        ``torch.load(weights_only=True)`` as is); ``epoch``/``batches``/``done`` say where this
        pass stands and ``generators`` holds the states of the loader's and samplers' torch
        Generators, which a resume puts back.
        """
        if not self.stateful:
            return {}
        if self._pending is not None:
            return dict(self._pending)  # loaded but not resumed yet: still the position to save
        return {
            "loader": self.loader.state_dict(),  # type: ignore[attr-defined]
            "epoch": self._epoch,
            "batches": self._batches,
            "done": self._done,
            "generators": [g.get_state() for g in _loader_generators(self.loader)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep a checkpoint's loader state; the next ``epoch()`` call resumes from it."""
        if not state:
            self._pending = None
            return
        if not self.stateful:
            raise CheckpointError(
                f"the checkpoint holds a StatefulDataLoader's state but the data is a {type(self.loader).__name__}: "
                f"resume with the loader the run was started with."
            )
        well_formed = (
            isinstance(state, Mapping)
            and isinstance(state.get("loader"), Mapping)
            and isinstance(state.get("batches"), int) and state["batches"] >= 0
            and isinstance(state.get("done"), bool)
            and (state.get("epoch") is None or isinstance(state.get("epoch"), int))
            and isinstance(state.get("generators"), list)
        )
        if not well_formed:
            raise CheckpointError("the checkpoint's loader state lacks loader/epoch/batches/done/generators.")
        self._pending = dict(state)


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


@contextlib.contextmanager
def rngs_restored() -> Iterator[None]:
    """Reading samples outside the loop (augmentation draws from the global RNGs) leaves the
    run's random streams as they were, so a check does not change what the run trains on."""
    states = (torch.get_rng_state(), random.getstate(), None if _np is None else _np.random.get_state())
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        if _np is not None:
            _np.random.set_state(states[2])


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


def _is_ndarray(data: Any) -> bool:
    return _np is not None and isinstance(data, _np.ndarray)


def _is_map_style(data: Any) -> bool:
    """A torch Dataset, or a dataset-like object (``__getitem__`` and ``__len__``, e.g. Hugging Face)."""
    if isinstance(data, IterableDataset):
        return False
    if isinstance(data, Dataset):
        return True
    if isinstance(data, (*_NOT_BATCHES, Sequence, Iterator)) or _is_ndarray(data):
        return False  # a list/tuple is a list of batches; str, tensors, arrays, dicts are rejected
    return hasattr(data, "__getitem__") and hasattr(data, "__len__")


def _shards_itself(loader: DataLoader) -> bool:
    """True when each rank's loader yields its own part of the data (a DistributedSampler or alike)."""
    if isinstance(loader.dataset, IterableDataset):
        return True  # no sampler to replace: the dataset must shard by rank itself
    return any(
        isinstance(s, torch.utils.data.DistributedSampler) or callable(getattr(s, "set_epoch", None))
        for s in _samplers(loader)
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
        _check_batch_size(batch_size)
        _check_num_workers(num_workers)
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
    if isinstance(data, Iterable) and not isinstance(data, _NOT_BATCHES) and not _is_ndarray(data):
        return LoaderBatches(data, steps_per_epoch=steps_per_epoch)
    hint = " (wrap tensors as TensorDataset(x, y))" if isinstance(data, Tensor) or _is_ndarray(data) else ""
    raise ConfigError(
        f"cannot train on {type(data).__name__}{hint}: pass {', '.join(ACCEPTED_DATA[:-1])} or {ACCEPTED_DATA[-1]}."
    )
