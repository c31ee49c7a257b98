"""The pieces of an optimizer step the loop composes: batches grouped for accumulation and cut into
micro-batches, the profiler's phase labels, and the buffer snapshot a step can be undone with."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from trainkit.data.device import DeviceBatches
from trainkit.errors import DataError
from trainkit.data.runtime import split_batch

Batch = Any  # a tensor, tuple, list, dict or dataclass of tensors (trainkit.data.runtime)


def phase(name: str):
    """Label a phase of the step ("data", "forward", "backward", "optimizer") for ``trainkit profile``.

    A no-op unless a profiler is running: record_function alone costs ~10 us per call on CPU.
    """
    return record_function(name) if torch.autograd.profiler._is_profiler_enabled else nullcontext()


class BufferSnapshot:
    """Copies of a model's buffers (BatchNorm running statistics and counters), so a step that is
    skipped (``--on-nonfinite skip``) or retried after running out of memory can undo what its
    forward passes did to them. One foreach copy per step; nothing for a model without buffers."""

    def __init__(self, model: nn.Module) -> None:
        self.live = list(model.buffers())
        self.saved = [buffer.detach().clone() for buffer in self.live]

    @torch.no_grad()
    def take(self) -> None:
        if self.live:
            torch._foreach_copy_(self.saved, self.live)

    @torch.no_grad()
    def restore(self) -> None:
        if self.live:
            torch._foreach_copy_(self.live, self.saved)


def labelled_as_data(batches: Iterable[Batch], where: Callable[[], str]) -> Iterator[Batch]:
    """The batches, with fetching each one (indexing, augmentation) labelled "data" for the profiler;
    a DataError while fetching (samples that do not stack) says ``where()`` it happened."""
    iterator = iter(batches)
    while True:
        with phase("data"):
            try:
                batch = next(iterator, None)
            except DataError as exc:
                raise DataError(f"{where()}: {data_error_text(exc)}") from None
        if batch is None:
            return
        yield batch


def data_error_text(exc: DataError) -> str:
    """A DataError's message; one raised in a DataLoader worker comes back wrapped in the worker's
    traceback, whose last line holds it."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(f"{DataError.__name__}: ", 1)[-1]
    return text


def split_micro_batches(group: list[Batch], size: int | None) -> list[Batch]:
    """Each micro-batch of ``group`` cut into pieces of at most ``size`` rows, in order (None: as is)."""
    if size is None:
        return group
    return [piece for batch in group for piece in split_batch(batch, size)]


def group_batches(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Consecutive micro-batches in groups of ``size``; the last group may be shorter."""
    group: list[Batch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def has_samples(data: Any) -> bool:
    """False for evaluation data known to be empty (--val-size 0)."""
    if isinstance(data, DeviceBatches):
        return data.num_samples > 0
    try:
        return len(data) > 0
    except TypeError:
        return True
