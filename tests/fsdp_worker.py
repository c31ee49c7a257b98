"""Trainer runs under torchrun for tests/test_fsdp.py: `torchrun ... fsdp_worker.py STRATEGY OUT_DIR`.

Scenarios exercise what a command-line run cannot set up: a loss that turns NaN at a chosen
step on one rank (the NaN policies), a model that runs out of memory above a micro-batch size
(the OOM back-off) and evaluation shards of different lengths; and, one launch for all, bf16 and
--sync-batchnorm with BatchNorm. Rank 0 writes the whole final
weights and the counters of each scenario's run to OUT_DIR/results.pt, so the test compares strategies.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from trainkit import distributed
from trainkit.config.schema import TrainConfig
from trainkit.data.device import DeviceBatches
from trainkit.loop.trainer import Trainer

BATCH = 32


class Net(nn.Module):
    """A small MLP; ``oom_above``: raises torch.OutOfMemoryError for larger micro-batches, as a GPU would."""

    def __init__(self, oom_above: int | None = None, batchnorm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.oom_above = oom_above
        norm = [nn.BatchNorm1d(64)] if batchnorm else []
        self.body = nn.Sequential(nn.Linear(12, 64), *norm, nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.oom_above is not None and self.training and x.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError(f"simulated: a micro-batch of {x.shape[0]} does not fit")
        return self.head(self.body(x))


class NaNOnRank1At:
    """Cross-entropy, NaN on rank 1 at the given training forward calls (the other ranks stay finite)."""

    def __init__(self, calls: set[int]) -> None:
        self.calls, self.seen = calls, 0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(logits, targets)
        if torch.is_grad_enabled():
            self.seen += 1
            if self.seen in self.calls and distributed.rank() == 1:
                return loss * float("nan")
        return loss


def data(n: int, rank: int, world: int, *, shuffle: bool = True, batch: int = BATCH) -> DeviceBatches:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 12, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return DeviceBatches(x, y, batch, seed=3, shuffle=shuffle, lockstep=shuffle, rank=rank, world_size=world)


SCENARIOS = ("nan-skip", "nan-rollback", "oom", "bf16", "sync-bn")


def run(scenario: str, strategy: str, out: Path) -> dict:
    settings = dict(batch_size=BATCH, epochs=3, patience=0, device="cpu", lr=3e-3, strategy=strategy,
                    eval_batch_size=16, checkpoint_every_steps=4)  # fmt: skip
    model, loss_fn = Net(), None
    if scenario == "nan-skip":
        settings.update(on_nonfinite="skip")
        loss_fn = NaNOnRank1At({7})
    elif scenario == "nan-rollback":
        settings.update(on_nonfinite="rollback")
        loss_fn = NaNOnRank1At({14})
    elif scenario == "oom":
        settings.update(accumulate=2)
        model = Net(oom_above=10)
    elif scenario == "bf16":  # FSDP: MixedPrecisionPolicy; DDP: autocast
        settings.update(precision="bf16")
    elif scenario == "sync-bn":  # SGD: see test_distributed.SGD_BN
        settings.update(sync_batchnorm=True, optimizer="sgd", lr=0.05)
        model = Net(batchnorm=True)
    rank, world = distributed.rank(), distributed.world_size()
    trainer = Trainer(model, TrainConfig(**settings), loss_fn=loss_fn, out_dir=out / scenario)
    # 203 validation rows in evaluation batches of 16: the ranks get 7 and 6 batches
    history = trainer.fit(data(320, rank, world), data(203, rank, world, shuffle=False, batch=16))
    return {"weights": trainer.full_state_dict(), "steps": trainer.state.global_step, "rollbacks": trainer.rollbacks,
            "lr_scale": trainer.lr_scale, "micro_batch_size": trainer.micro_batch_size,
            "skipped": sum(row.get("skipped_steps", 0) for row in history),
            "val_loss": [row["val_loss"] for row in history]}  # fmt: skip


if __name__ == "__main__":
    strategy, out = sys.argv[1], Path(sys.argv[2])
    with distributed.process_group(torch.device("cpu")):
        results = {scenario: run(scenario, strategy, out) for scenario in SCENARIOS}
        if distributed.rank() == 0:
            torch.save(results, out / "results.pt")
