"""Crashing a run in process at a chosen moment: what a killed job leaves behind, without a subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainkit.loop.callbacks import Callback
from trainkit.config.schema import TrainConfig
from trainkit.recipes.run import train_run


class CrashAtEpoch(Callback):
    """Raises at the start of ``epoch``: the checkpoints of the epochs before it are on disk."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, state) -> None:
        if state.epoch == self.epoch:
            raise RuntimeError("simulated crash")


def crash(config: TrainConfig, epoch: int) -> Path:
    """Run ``config`` until the start of ``epoch``; returns its output folder."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(config, extra_callbacks=[CrashAtEpoch(epoch)])
    return Path(config.out)
