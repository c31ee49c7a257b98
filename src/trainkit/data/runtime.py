"""Batches as trees of tensors: moving them to the device, counting and cutting them.

A batch may be a tensor, a tuple/list (named tuples too), a dict, or a dataclass of tensors,
nested to any depth; anything else in it (strings, numbers, None) is carried along unchanged.
The common ``(inputs, targets)`` pair of tensors takes a fast path: the per-step cost of the
general walk is measured in docs/benchmarks.md ("Batch structures").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from trainkit.errors import ConfigError


def map_tensors(fn: Callable[[Tensor], Any], batch: Any) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it, the structure kept."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return _same_mapping(batch, {key: map_tensors(fn, value) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # named tuple
        return type(batch)(*(map_tensors(fn, v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(fn, v) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changed = {f.name: map_tensors(fn, getattr(batch, f.name)) for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **changed)
    return batch


def _same_mapping(original: Mapping, items: dict[str, Any]) -> Mapping:
    """``items`` in the original mapping's type when it can be built from a dict (OrderedDict,
    a tokenizer's BatchEncoding), else a plain dict."""
    if type(original) is dict:
        return items
    try:
        return type(original)(items)
    except Exception:
        return items


def tensors_in(batch: Any) -> list[Tensor]:
    """Every tensor in the batch, in structure order."""
    found: list[Tensor] = []
    map_tensors(lambda t: found.append(t) or t, batch)
    return found


def to_device(batch: Any, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format) -> Any:
    """The batch on ``device`` (non-blocking copies); 4-D tensors in ``memory_format`` (channels_last for CNNs)."""
    if type(batch) is tuple and len(batch) == 2 and type(batch[0]) is Tensor and type(batch[1]) is Tensor:
        inputs, targets = batch  # the (inputs, targets) fast path
        return _move(inputs, device, memory_format), targets.to(device, non_blocking=True)
    return map_tensors(lambda t: _move(t, device, memory_format), batch)


def _move(tensor: Tensor, device: torch.device, memory_format: torch.memory_format) -> Tensor:
    tensor = tensor.to(device, non_blocking=True)
    if memory_format is not torch.contiguous_format and tensor.dim() == 4:
        return tensor.contiguous(memory_format=memory_format)
    return tensor


def batch_rows(batch: Any) -> int:
    """Rows (samples) in a batch: the first dimension of its first tensor."""
    if type(batch) is tuple and len(batch) == 2 and type(batch[1]) is Tensor:
        return batch[1].shape[0] if batch[1].dim() else 1
    tensors = tensors_in(batch)
    if not tensors:
        raise ConfigError(f"a batch must hold at least one tensor; got {type(batch).__name__} without any")
    first = tensors[0]
    return first.shape[0] if first.dim() else 1


def split_batch(batch: Any, size: int) -> list[Any]:
    """The batch cut along its first dimension into pieces of at most ``size`` rows.

    Every tensor whose first dimension is the batch's row count is cut; other leaves
    (scalars, shared masks, strings) are repeated in each piece.
    """
    rows = batch_rows(batch)
    if rows <= size:
        return [batch]
    starts = range(0, rows, size)

    def piece(start: int) -> Any:
        return map_tensors(lambda t: t[start : start + size] if t.dim() and t.shape[0] == rows else t, batch)

    return [piece(start) for start in starts]


def concatenate(pieces: list[Any]) -> Any:
    """Per-batch outputs joined along the first dimension, structure kept (tensors, tuples, dicts)."""
    first = pieces[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(pieces)
    if isinstance(first, Mapping):
        return {key: concatenate([piece[key] for piece in pieces]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concatenate(list(parts)) for parts in zip(*pieces))
    return pieces
