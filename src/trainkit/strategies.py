"""How a training step runs across processes: one process, DDP, or FSDP2.

The Trainer holds one ``Strategy`` and calls it at named points — preparing the model, the
gradient sync under accumulation, the agreement before a step, the size each micro-batch's share
is taken of, evaluation in lockstep, the whole weights — and never asks which one it is (the shape
of Lightning Fabric's strategies, without launchers or precision plugins). Every method that
communicates is an agreement point: all ranks call it, in the same order.

``Trainer(..., strategy=...)`` takes your own subclass (experimental: the interface may still
grow as the Trainer's remaining strategy branches move here; docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainkit import distributed, fsdp
from trainkit.runtime import batch_rows

if TYPE_CHECKING:
    from trainkit.config import TrainConfig

Batch = Any  # a tensor, tuple, list, dict or dataclass of tensors (trainkit.runtime)


@dataclass
class Prepared:
    """A model made ready to train by a strategy."""

    model: nn.Module  # plain parameter names: what state_dict, the optimizer and averages see
    forward: nn.Module  # the training forward (the DDP wrapper; compiled under --compile)
    eval_forward: nn.Module  # evaluation's (never the DDP wrapper: ranks evaluate unequal batches)
    autocast: bool  # whether the loop autocasts (FSDP's mixed-precision policy replaces it)


class Strategy:
    """One process: every agreement point is an identity."""

    distributed = False  # a process group spreads the run
    sharded = False  # parameters are DTensor shards

    def __init__(self) -> None:
        self.rank, self.world_size = distributed.rank(), distributed.world_size()

    def prepare(self, model: nn.Module, config: TrainConfig, device: torch.device) -> Prepared:
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        forward = compiled(model, config)
        return Prepared(model, forward, forward, autocast=True)

    def gradient_sync(self, last_micro_batch: bool) -> AbstractContextManager:
        """Around a micro-batch's backward: gradients are reduced only in a group's last one."""
        return nullcontext()

    def reduces_in_backward(self, last_micro_batch: bool) -> bool:
        """Whether this backward all-reduces (an out-of-memory error inside it cannot be retried)."""
        return False

    def before_step(self, model: nn.Module) -> None:
        """The ranks' buffers agree before a step."""

    def group_size(self, weight: Any, counts: list[Any], micro_batches: list[Batch], known: int | None,
                   device: torch.device) -> Any:  # fmt: skip
        """What each micro-batch's share of the loss is taken of: the group's samples."""
        return weight

    def in_lockstep(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, bool]]:
        """Evaluation's (batch, counted) pairs."""
        return ((batch, True) for batch in batches)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole weights (under FSDP a collective, gathered to rank 0's host)."""
        return model.state_dict()


def compiled(module: nn.Module, config: TrainConfig) -> nn.Module:
    """The training forward, compiled under --compile."""
    return torch.compile(module) if config.compile else module


def global_group_size(weight: Any, counts: list[Any], micro_batches: list[Batch], known: int | None,
                      world_size: int, device: torch.device) -> Any:  # fmt: skip
    """What each rank's micro-batch shares are taken of, so that the gradient average is the mean
    over the whole global group even when ranks count different numbers of samples."""
    rows_counted = all(isinstance(c, int) and c == batch_rows(b) for c, b in zip(counts, micro_batches))
    if known is not None and rows_counted:
        return known / world_size
    # agreement point: the group's samples (tokens, elements) over all ranks, on the device
    total = torch.as_tensor(weight, dtype=torch.float64, device=device).clone()
    return distributed.all_reduce_sum(total) / world_size


class DataParallel(Strategy):
    """DDP: every rank holds the whole model; gradients are all-reduced in the last backward."""

    distributed = True

    def prepare(self, model: nn.Module, config: TrainConfig, device: torch.device) -> Prepared:
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        if config.sync_batchnorm:
            model = distributed.sync_batchnorm(model, device)
        device_ids = [device.index] if device.type == "cuda" else None
        self.ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return Prepared(model, compiled(self.ddp, config), model, autocast=True)

    def gradient_sync(self, last_micro_batch: bool) -> AbstractContextManager:
        return nullcontext() if last_micro_batch else self.ddp.no_sync()

    def reduces_in_backward(self, last_micro_batch: bool) -> bool:
        return last_micro_batch

    def group_size(self, weight: Any, counts: list[Any], micro_batches: list[Batch], known: int | None,
                   device: torch.device) -> Any:  # fmt: skip
        return global_group_size(weight, counts, micro_batches, known, self.world_size, device)


class FullySharded(Strategy):
    """FSDP2: parameters are DTensor shards (trainkit.fsdp); its mixed-precision policy replaces
    autocast, every forward all-gathers, so evaluation runs in lockstep."""

    distributed = True
    sharded = True

    def prepare(self, model: nn.Module, config: TrainConfig, device: torch.device) -> Prepared:
        # FSDP shards contiguous parameters only: under channels_last the inputs alone are NHWC
        if config.sync_batchnorm:
            model = distributed.sync_batchnorm(model, device)
        fsdp.check_offload(config.fsdp_offload, device)
        if device.type == "cpu" or config.fsdp_offload:
            fsdp.keep_large_allocations_out_of_the_heap()
        self.model = fsdp.shard_model(model, precision=config.precision, offload=config.fsdp_offload,
                                      units=config.fsdp_units)  # fmt: skip
        return Prepared(self.model, compiled(self.model, config), self.model, autocast=False)

    def gradient_sync(self, last_micro_batch: bool) -> AbstractContextManager:
        return nullcontext() if last_micro_batch else fsdp.gradient_sync(self.model, False)

    def before_step(self, model: nn.Module) -> None:
        distributed.broadcast_buffers(model)  # rank 0's BatchNorm statistics everywhere, as DDP's forward does

    def group_size(self, weight: Any, counts: list[Any], micro_batches: list[Batch], known: int | None,
                   device: torch.device) -> Any:  # fmt: skip
        return global_group_size(weight, counts, micro_batches, known, self.world_size, device)

    def in_lockstep(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, bool]]:
        return fsdp.in_lockstep(batches)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return fsdp.full_model_state(model)


def make_strategy(config: TrainConfig) -> Strategy:
    """One process without a process group; with one, FSDP for --strategy fsdp, else DDP."""
    if not distributed.is_active():
        return Strategy()
    return FullySharded() if config.strategy == "fsdp" else DataParallel()
