"""How a training step runs across processes: one process, DDP, or FSDP2.

The Trainer holds one ``Strategy`` and calls it at named points — preparing the model, the
gradient sync under accumulation, the agreement before a step, the size each micro-batch's share
is taken of, the total gradient norm, evaluation in lockstep, the decisions the ranks share, what
a checkpoint stores and how it is written and read back, the whole weights — and never asks which
one it is (the shape of Lightning Fabric's strategies, without launchers or precision plugins).
Every method that communicates is an agreement point: all ranks call it, in the same order; in
one process each is an identity.

``Trainer(..., strategy=...)`` takes your own subclass (experimental: the interface may still
change; docs/architecture.md says how to add one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainkit import distributed
from trainkit.distributed import fsdp
from trainkit.checkpoint.file import all_finite
from trainkit.checkpoint.sharded import load_into, sharded_copies, with_copies
from trainkit.errors import TrainkitError
from trainkit.data.runtime import batch_rows

if TYPE_CHECKING:
    from trainkit.config.schema import TrainConfig

Batch = Any  # a tensor, tuple, list, dict or dataclass of tensors (trainkit.data.runtime)
Outcome = tuple[Any, str | None]  # a checkpoint write's (path, error message)
OOM_ADVICE = ("resume with a smaller --batch-size (and --accumulate to keep the effective batch), "
              "--grad-checkpointing or --precision bf16")  # fmt: skip


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

    # ------------------------------------------------ decisions the ranks share
    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, True everywhere when it is True on some rank (one collective for all)."""
        return flags

    def every_rank(self, flag: bool) -> bool:
        """True everywhere only when it is True on every rank."""
        return flag

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        return value

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place, and returned (metric sums, evaluation totals)."""
        return tensor

    def broadcast(self, value: Any) -> Any:
        """Rank 0's value (a decision, a metrics row, a save's outcome) on every rank."""
        return value

    def per_rank(self, value: Any) -> list[Any] | None:
        """Every rank's value in rank order, for a checkpoint's ``per_rank`` (None: one process)."""
        return None

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) everywhere, e.g. before evaluation."""

    def full_value(self, tensor: torch.Tensor) -> torch.Tensor:
        """A value every rank agrees on (a DTensor's whole value)."""
        return tensor

    def weights_finite(self, model: nn.Module) -> bool:
        """No NaN/inf in the weights or buffers, on every rank."""
        return self.every_rank(all_finite(fsdp.local_state(model.state_dict())))

    # ---------------------------------------------------- the step's pieces
    @torch.no_grad()
    def clip_gradients(self, model: nn.Module, clip_value: float | None, clip_norm: float | None,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Clip by value and/or norm; the pre-clip total norm and whether anything was clipped."""
        params = [p for p in model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        if clip_value is not None or clip_norm is None:
            pre_clip_norm = self.full_value(torch.nn.utils.get_total_norm(grads, foreach=True))
        clipped = None
        if clip_value is not None:
            clipped = self.full_value(torch.nn.utils.get_total_norm(grads, math.inf, foreach=True)) > clip_value
            torch.nn.utils.clip_grad_value_(params, clip_value, foreach=True)
        if clip_norm is not None:
            # the norm before this clipping (what clip_grad_norm_ computes): the pre-clip norm unless value-clipping ran first
            norm = self.full_value(torch.nn.utils.get_total_norm(grads, foreach=True))
            torch.nn.utils.clip_grads_with_norm_(params, clip_norm, norm, foreach=True)
            clipped = norm > clip_norm if clipped is None else clipped | (norm > clip_norm)
            if clip_value is None:
                pre_clip_norm = norm
        if clipped is None:  # no clipping configured
            clipped = torch.zeros((), device=device, dtype=torch.bool)
        return pre_clip_norm, clipped

    def agree_to_back_off(self, step: int, mid_reduction: bool) -> None:
        """Out of memory in a step: every rank must halve its micro-batch together (one process: it may)."""

    def evaluation_can_back_off(self) -> bool:
        """Whether an evaluation batch that ran out of memory may be cut in pieces on this rank alone."""
        return True

    # ------------------------------------------------------------ checkpoints
    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, payload: dict[str, Any],
             write: Callable[[dict[str, Any]], Outcome]) -> Outcome:  # fmt: skip
        """Write a checkpoint payload (``write`` returns (path, error)); every rank gets the outcome."""
        return write(payload)

    def load_weights(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                     payload: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
        """Model and optimizer state from a checkpoint; returns the callbacks' saved states (with
        their weight copies). A sharded checkpoint (a folder) is read through
        torch.distributed.checkpoint, which reshards it onto this run's processes, sharded or not."""
        if "sharded" in payload:
            model_state, optimizer_state = fsdp.sharded_state(model, optimizer)
            copies = {key: {name: torch.empty_like(value) for name, value in model_state.items()}
                      for key in sharded_copies(payload["callbacks"])}  # fmt: skip
            load_into(Path(payload["sharded"]), {"model": model_state, "optimizer": optimizer_state, **copies})
            fsdp.restore_sharded_state(model, optimizer, model_state, optimizer_state)
            return with_copies(payload["callbacks"], copies)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        return payload["callbacks"]


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


class ProcessGroupStrategy(Strategy):
    """What every strategy over a process group shares: the decisions go through collectives
    (trainkit.distributed), rank 0 writes the files, and every rank learns the outcome."""

    distributed = True

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        return distributed.any_ranks(*flags)

    def every_rank(self, flag: bool) -> bool:
        return distributed.every_rank(flag)

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        return int(distributed.all_reduce_min(torch.tensor(value, device=device)).item())

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(tensor)

    def broadcast(self, value: Any) -> Any:
        return distributed.broadcast_object(value)

    def per_rank(self, value: Any) -> list[Any] | None:
        return distributed.gather_objects(value)

    def broadcast_buffers(self, module: nn.Module) -> None:
        distributed.broadcast_buffers(module)

    def group_size(self, weight: Any, counts: list[Any], micro_batches: list[Batch], known: int | None,
                   device: torch.device) -> Any:  # fmt: skip
        return global_group_size(weight, counts, micro_batches, known, self.world_size, device)

    def agree_to_back_off(self, step: int, mid_reduction: bool) -> None:
        """Ranks with the same shapes run out together and all retry; a rank that ran out alone (the
        others are inside this step's collectives), or DDP interrupted mid-reduction (it cannot
        start another), stops the run with one line instead of hanging."""
        if mid_reduction:
            raise TrainkitError(f"out of memory at step {step} on rank {self.rank} in the backward pass that "
                                f"all-reduces DDP's gradients, which cannot be retried; {OOM_ADVICE}")  # fmt: skip
        if not distributed.every_rank_out_of_memory():
            raise TrainkitError(f"out of memory at step {step} on rank {self.rank} but not on every rank, so the "
                                f"micro-batch cannot be halved in step; {OOM_ADVICE}")  # fmt: skip

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, payload: dict[str, Any],
             write: Callable[[dict[str, Any]], Outcome]) -> Outcome:  # fmt: skip
        """Every rank built the payload (it gathers per-rank state); rank 0 writes, and every rank
        learns the outcome, so a failed save stops all ranks or none."""
        return distributed.broadcast_object(write(payload) if self.rank == 0 else (None, None))


class DataParallel(ProcessGroupStrategy):
    """DDP: every rank holds the whole model; gradients are all-reduced in the last backward."""

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


class FullySharded(ProcessGroupStrategy):
    """FSDP2: parameters are DTensor shards (trainkit.distributed.fsdp); its mixed-precision policy replaces
    autocast, every forward all-gathers, so evaluation runs in lockstep."""

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

    def in_lockstep(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, bool]]:
        return fsdp.in_lockstep(batches)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return fsdp.full_model_state(model)

    def full_value(self, tensor: torch.Tensor) -> torch.Tensor:
        return fsdp.full_value(tensor)  # the norm of sharded gradients is a DTensor: an all-reduce

    def evaluation_can_back_off(self) -> bool:
        return False  # every forward is a collective the other processes are in

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, payload: dict[str, Any],
             write: Callable[[dict[str, Any]], Outcome]) -> Outcome:  # fmt: skip
        """Every rank writes its shards (trainkit.checkpoint.sharded), rank 0 commits; DCP writes
        one rank's copy of each buffer: rank 0's, broadcast first."""
        distributed.broadcast_buffers(model)
        payload["model"], payload["optimizer"] = fsdp.sharded_state(model, optimizer)
        return distributed.broadcast_object(write(payload))

    def load_weights(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                     payload: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
        """A one-file checkpoint goes in as whole tensors that each rank cuts its shards from (the
        callbacks' weight copies too); a sharded one as any strategy reads it."""
        if "sharded" in payload or fsdp.holds_dtensors(payload["model"]):
            return super().load_weights(model, optimizer, payload)
        fsdp.restore_full_state(model, optimizer, payload["model"], payload["optimizer"])
        return fsdp.shard_weight_copies(payload["callbacks"], model.state_dict())


def make_strategy(config: TrainConfig) -> Strategy:
    """One process without a process group; with one, FSDP for --strategy fsdp, else DDP."""
    if not distributed.is_active():
        return Strategy()
    return FullySharded() if config.strategy == "fsdp" else DataParallel()
