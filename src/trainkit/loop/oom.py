"""Out of memory during training or evaluation: halve the micro-batch and go on, or say in one
line why the run cannot (docs/reliability.md).

The accumulation group (effective batch, data order, loss weighting) stays the same: only the
number of forward/backward passes it takes grows, so the run's numbers do not change.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from trainkit.devices import free_cached_device_memory
from trainkit.errors import TrainkitError
from trainkit.loop.steps import BufferSnapshot
from trainkit.data.runtime import batch_rows
from trainkit.distributed.strategies import Strategy

log = logging.getLogger("trainkit")

Batch = Any


class MicroBatchBackoff:
    """The micro-batch sizes the run fell back to (None: whole batches), and how it got there."""

    def __init__(self, strategy: Strategy, optimizer: torch.optim.Optimizer, buffers: BufferSnapshot,
                 device: torch.device, accumulate: int) -> None:  # fmt: skip
        self.strategy, self.optimizer, self.buffers = strategy, optimizer, buffers
        self.device, self.accumulate = device, accumulate
        self.micro_batch_size: int | None = None  # training micro-batches are cut to this from now on
        self.eval_micro_batch_size: int | None = None  # evaluation batches likewise

    def halve(self, group: list[Batch], step: int, *, mid_reduction: bool = False) -> None:
        """Out of memory in the device copy, a forward or a backward: halve the micro-batch for the
        rest of training; the caller retries the group from its first micro-batch. What the failed
        try did is undone first: its gradients, and the BatchNorm statistics its forwards updated
        (its metrics were not counted).

        Agreement point (DDP, FSDP): every rank backs off together, or the run stops in one line."""
        self.strategy.agree_to_back_off(step, mid_reduction)
        self.optimizer.zero_grad(set_to_none=True)
        self.buffers.restore()
        free_cached_device_memory(self.device)
        full_batch = max(batch_rows(batch) for batch in group)
        current = min(self.micro_batch_size or full_batch, full_batch)
        if current <= 1:
            raise TrainkitError(
                f"out of memory at step {step} even with a micro-batch of 1; use a smaller model, "
                f"--grad-checkpointing, --precision bf16 or a device with more memory"
            )
        self.micro_batch_size = (current + 1) // 2
        micro_batches_per_step = self.accumulate * math.ceil(full_batch / self.micro_batch_size)
        log.warning(
            "out of memory at step %d with micro-batch %d: continuing with micro-batches of %d x accumulation %d",
            step, current, self.micro_batch_size, micro_batches_per_step,
        )  # fmt: skip

    def halve_evaluation(self, rows: int) -> None:
        """Evaluate in pieces of half the rows from now on (loss and metrics are sums over samples,
        so the pieces add up to the whole batch's numbers); not where every forward is a
        collective the other processes are in (FSDP)."""
        lockstep = not self.strategy.evaluation_can_back_off()
        if lockstep or rows <= 1:
            raise TrainkitError(f"out of memory evaluating a batch of {rows} row(s)"
                                + (" under --strategy fsdp" if lockstep else "")
                                + "; lower --eval-batch-size or use a device with more memory")  # fmt: skip
        free_cached_device_memory(self.device)
        self.eval_micro_batch_size = (rows + 1) // 2
        log.warning("out of memory evaluating %d rows at once: evaluating in pieces of %d from now on",
                    rows, self.eval_micro_batch_size)  # fmt: skip

    def step_optimizer(self, scaler: torch.amp.GradScaler, step: int) -> None:
        """The optimizer step (through the GradScaler). Its first step allocates the optimizer's
        state (AdamW: two copies of the weights): out of memory there, the partial state is dropped
        and the step retried once after freeing cached memory; any other out-of-memory in the
        update is one line (the update may be half applied, so the run cannot go on from it)."""
        optimizer = self.optimizer
        first_step = not optimizer.state
        try:
            scaler.step(optimizer)
            return
        except torch.OutOfMemoryError:
            pass  # the traceback holds partial state: free it after leaving this block
        if first_step:
            optimizer.state.clear()
            free_cached_device_memory(self.device)
            try:
                scaler.step(optimizer)
                return
            except torch.OutOfMemoryError:
                optimizer.state.clear()
        what = (f"allocating its state ({type(optimizer).__name__} keeps copies of the weights)" if first_step
                else "mid-update, so the weights may be half updated: resume from the last checkpoint")  # fmt: skip
        raise TrainkitError(f"out of memory in the optimizer step at step {step}, {what}; use a smaller model, "
                            f"--optimizer sgd, --strategy fsdp or a device with more memory")  # fmt: skip
