"""The process's global random streams around data: a batch fetch seeded by its own (seed, epoch,
batch), the loop's streams saved and put back around it, and samples read outside the loop (the
checks before training) leaving every stream as it was."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import torch

try:  # numpy's global RNG is seeded/restored around batch fetches when numpy is there
    import numpy as _np
except ImportError:  # pragma: no cover - torch works without numpy
    _np = None


def seed_global_rngs(seed: int) -> None:
    # The CPU generator only: torch.manual_seed would also reseed every CUDA device's generator.
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    if _np is not None:
        _np.random.seed([seed & 0xFFFFFFFF, seed >> 32])


def loop_rng_states() -> tuple[Any, Any]:
    """The RNGs the training loop draws from (dropout, the user's Python code): torch CPU and
    ``random``. NumPy's global state is not saved: it costs ~95 µs a batch (docs/benchmarks.md,
    "Data paths") and the loop never draws from it; after a main-process fetch it is the
    batch's seeded stream, a function of (seed, epoch, batch), so a resume stays exact."""
    return torch.get_rng_state(), random.getstate()


def set_loop_rng_states(states: tuple[Any, Any]) -> None:
    torch.set_rng_state(states[0])
    random.setstate(states[1])


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


def is_ndarray(data: Any) -> bool:
    return _np is not None and isinstance(data, _np.ndarray)
