"""``LoaderBatches``: a DataLoader (or any iterable of batches) the user built. A torchdata
``StatefulDataLoader`` resumes from its saved state (exact order); any other loader resumes by
replaying and discarding the epoch's first batches (not exact).
"""

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from trainkit.errors import CheckpointError, ConfigError

log = logging.getLogger("trainkit")


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


def samplers(loader: Any) -> list[Any]:
    """The loader's sampler and its batch sampler's sampler, without duplicates."""
    found: list[Any] = []
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if sampler is not None and all(sampler is not s for s in found):
            found.append(sampler)
    return found


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The torch Generators a loader and its samplers draw from, without duplicates, in a fixed order."""
    found: list[torch.Generator] = []
    for owner in (loader, *samplers(loader)):
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
        for sampler in samplers(self.loader):
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
