"""``DeviceBatches``: mini-batches sliced out of tensors that already live on the device (no
DataLoader workers, no per-sample Python); each epoch's order comes from a generator seeded by
(seed, epoch) alone. The sharding across ranks that ``DatasetBatches`` shares.

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

import hashlib
from collections.abc import Iterator

import torch
from torch import Tensor

from trainkit.errors import ConfigError


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
