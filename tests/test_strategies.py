"""trainkit.distributed.strategies: how a step runs across processes, behind one interface the Trainer calls at
named points. The DDP and FSDP strategies run for real in test_distributed.py and test_fsdp.py
(2 processes, against single-process references); here, one process and a user's own."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn

from trainkit.checkpoint.file import model_sha256
from trainkit.config.schema import TrainConfig
from trainkit.data.device import DeviceBatches
from trainkit.errors import ConfigError
from trainkit.distributed.strategies import Strategy, make_strategy
from trainkit.loop.trainer import Trainer


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "accumulate": 3, "patience": 0, "device": "cpu", **overrides})


def data() -> DeviceBatches:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(80, 12, generator=generator)
    return DeviceBatches(x, (x[:, 0] > 0).long(), 16, seed=1)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))


class Recording(Strategy):
    """One process, recording what the loop asks of it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def before_step(self, model: nn.Module) -> None:
        self.calls.append("before_step")

    def gradient_sync(self, last_micro_batch: bool):
        @contextmanager
        def recorded():
            self.calls.append("sync" if last_micro_batch else "no_sync")
            yield

        return recorded()

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        self.calls.append("full_state_dict")
        return super().full_state_dict(model)


def test_without_a_process_group_the_run_is_one_process():
    strategy = make_strategy(config(strategy="fsdp"))
    assert type(strategy) is Strategy and (strategy.rank, strategy.world_size) == (0, 1)
    assert not strategy.distributed and not strategy.sharded


def test_the_loop_calls_its_strategy_at_each_step_and_a_users_own_changes_nothing_else():
    reference = Trainer(model(), config())
    reference.fit(data())
    strategy = Recording()
    trainer = Trainer(model(), config(), strategy=strategy)
    trainer.fit(data())
    # 5 micro-batches an epoch in groups of 3: steps of 3 and 2 micro-batches, two epochs
    assert strategy.calls.count("before_step") == 4 == trainer.state.global_step
    assert strategy.calls.count("sync") == 4 and strategy.calls.count("no_sync") == 2 * (2 + 1)
    assert trainer.full_state_dict().keys() == reference.model.state_dict().keys()
    assert strategy.calls[-1] == "full_state_dict"
    assert model_sha256(trainer.model) == model_sha256(reference.model)


def test_a_strategy_that_is_not_one_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="strategy must be a trainkit.distributed.strategies.Strategy, got str"):
        Trainer(model(), config(), strategy="ddp")
