"""`torchrun --nproc_per_node 2 oom_alone_worker.py`: rank 1 alone runs out of memory at its third
training forward (tests/test_distributed.py). Rank 0 goes on into the step's gradient all-reduce,
so the ranks cannot halve their micro-batches together: the run must stop with one line, not hang."""

from __future__ import annotations

import torch
from torch import nn

from trainkit import distributed
from trainkit.config.schema import TrainConfig
from trainkit.data.device import DeviceBatches
from trainkit.loop.trainer import Trainer


class OutOfMemoryOnRank1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        if self.training and self.calls == 3 and distributed.rank() == 1:
            raise torch.OutOfMemoryError("simulated: rank 1 alone")
        return self.net(x)


if __name__ == "__main__":
    distributed.OOM_AGREEMENT_S = 3.0  # how long rank 1 waits for the others (60 s in a real run)
    with distributed.process_group(torch.device("cpu")):
        rank, world = distributed.rank(), distributed.world_size()
        x = torch.randn(256, 12, generator=torch.Generator().manual_seed(1))
        batches = DeviceBatches(x, (x[:, 0] > 0).long(), 32, seed=3, rank=rank, world_size=world)
        config = TrainConfig(batch_size=32, epochs=1, patience=0, device="cpu", strategy="ddp")
        Trainer(OutOfMemoryOnRank1(), config).fit(batches)
