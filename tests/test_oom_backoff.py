"""Out-of-memory back-off: halve the micro-batch, retry the same group, finish the run."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from trainkit.config.schema import TrainConfig
from trainkit.data.device import DeviceBatches
from trainkit.errors import TrainkitError
from trainkit.loop.steps import split_micro_batches
from trainkit.loop.trainer import Trainer


class OutOfMemoryAbove(nn.Module):
    """A small MLP whose forward raises torch.OutOfMemoryError for batches larger than ``limit``,
    the way a GPU would for a micro-batch whose activations do not fit."""

    def __init__(self, limit: int | None = None, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.limit = limit
        self.net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))
        self.batch_sizes_seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.limit is not None and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"simulated: a batch of {x.shape[0]} does not fit")
        self.batch_sizes_seen.append(x.shape[0])
        return self.net(x)


def toy_batches(batch_size: int, n: int = 300) -> DeviceBatches:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 12, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return DeviceBatches(x, y, batch_size, seed=3)


def train(model: nn.Module, batch_size: int, accumulate: int, epochs: int = 2) -> Trainer:
    config = TrainConfig(batch_size=batch_size, accumulate=accumulate, epochs=epochs, patience=0, device="cpu",
                         lr=3e-3, dropout=0.0, norm="none")  # fmt: skip
    trainer = Trainer(model, config)
    trainer.fit(toy_batches(batch_size))
    return trainer


def test_split_micro_batches_keeps_order_and_samples():
    group = [(torch.arange(5), torch.arange(5)), (torch.arange(5, 8), torch.arange(5, 8))]
    pieces = split_micro_batches(group, 2)
    assert [p[0].tolist() for p in pieces] == [[0, 1], [2, 3], [4], [5, 6], [7]]
    assert split_micro_batches(group, None) is group


def test_oom_halves_the_micro_batch_and_matches_the_smaller_micro_batch_from_the_start(caplog):
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        backed_off = train(OutOfMemoryAbove(limit=20), batch_size=64, accumulate=2)
    # 64 fails, 32 fails, 16 fits: the rest of training runs micro-batches of at most 16
    assert backed_off.micro_batch_size == 16
    assert max(backed_off.model.batch_sizes_seen) == 16
    messages = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert messages == [
        "out of memory at step 1 with micro-batch 64: continuing with micro-batches of 32 x accumulation 4",
        "out of memory at step 1 with micro-batch 32: continuing with micro-batches of 16 x accumulation 8",
    ]
    # 300 samples / (64 x 2) -> 3 optimizer steps per epoch, as without the OOM
    assert backed_off.state.global_step == 6 and len(backed_off.state.history) == 2

    # the same groups of samples, in the same order, as micro-batch 16 x accumulate 8 from the start
    small_from_start = train(OutOfMemoryAbove(), batch_size=16, accumulate=8)
    for got, want in zip(backed_off.model.parameters(), small_from_start.model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # ... and the same effective batch as one micro-batch of 128 that never ran out of memory
    one_big_batch = train(OutOfMemoryAbove(), batch_size=128, accumulate=1)
    for got, want in zip(backed_off.model.parameters(), one_big_batch.model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    last_loss = backed_off.state.history[-1]["train_loss"]
    assert last_loss == pytest.approx(one_big_batch.state.history[-1]["train_loss"], rel=1e-5)


def test_oom_with_a_micro_batch_of_one_gives_up_clearly():
    with pytest.raises(TrainkitError, match="out of memory at step 1 even with a micro-batch of 1"):
        train(OutOfMemoryAbove(limit=0), batch_size=8, accumulate=1, epochs=1)
