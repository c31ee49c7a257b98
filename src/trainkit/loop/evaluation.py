"""Evaluation and prediction, the same on every strategy: eval mode, ``torch.inference_mode()``,
rank 0's BatchNorm statistics, sums over samples all-reduced once, and evaluation batches that
ran out of memory cut into pieces whose sums add up to the whole batch's (trainkit.loop.oom)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from trainkit.data.epochs import as_epoch_batches
from trainkit.data.loader import LoaderBatches
from trainkit.config.schema import TrainConfig
from trainkit.devices import to_host
from trainkit.errors import DataError, TrainkitError
from trainkit.faults import crash_point
from trainkit.loop.oom import MicroBatchBackoff
from trainkit.loop.steps import split_micro_batches
from trainkit.data.runtime import batch_rows, concatenate, map_tensors, to_device
from trainkit.distributed.strategies import Strategy
from trainkit.tasks.base import StepOutput, Task, model_logits, model_loss
from trainkit.tasks.labels import LabelsSeen

Batch = Any


class Evaluator:
    """Runs a module over evaluation data for the Trainer's task, strategy and device."""

    def __init__(self, task: Task, strategy: Strategy, backoff: MicroBatchBackoff, config: TrainConfig,
                 device: torch.device, memory_format: torch.memory_format,
                 autocast: Callable[[], AbstractContextManager]) -> None:  # fmt: skip
        self.task, self.strategy, self.backoff, self.config = task, strategy, backoff, config
        self.device, self.memory_format, self.autocast = device, memory_format, autocast

    def batches(self, data: Any) -> Iterable[Batch]:
        """Evaluation data in order, this rank's shard (a user's loader is taken as it is)."""
        if isinstance(data, LoaderBatches):
            return data.loader
        batches = as_epoch_batches(
            data, batch_size=self.config.eval_batch_size, seed=self.config.seed, shuffle=False, lockstep=False,
            num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda",
            rank=self.strategy.rank, world_size=self.strategy.world_size, steps_per_epoch=1,
        )  # fmt: skip
        return batches.loader if isinstance(batches, LoaderBatches) else batches.epoch(0)

    @torch.inference_mode()
    def evaluate(self, module: nn.Module, forward: Callable[..., Any], data: Any) -> dict[str, float]:
        """The task's loss and metrics of ``module`` (run through ``forward``) on ``data``; every rank
        returns the same numbers."""
        module.eval()
        self.strategy.broadcast_buffers(module)  # [A] rank 0's BatchNorm statistics
        self.task.labels_seen(training=False)  # what an earlier evaluation left
        metrics = self.task.new_metrics()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        weight: Any = 0
        rows = 0
        for whole, counted in self.strategy.in_lockstep(self.batches(data)):  # [A] FSDP: in lockstep
            for batch, output in self._pieces(forward, whole):
                if not counted:
                    continue
                count = self.task.samples(batch)
                loss_sum += output.loss.double() * count
                if output.outputs is not None and output.targets is not None:
                    metrics.update(output.outputs, output.targets)
                weight = weight + count
                rows += batch_rows(batch)
            crash_point("validation")
        weight = weight if isinstance(weight, torch.Tensor) else loss_sum.new_tensor(float(weight))
        totals = torch.stack([loss_sum, weight.to(loss_sum), loss_sum.new_tensor(float(rows))])
        loss_total, weight_total, rows = self.strategy.sum_over_ranks(totals).tolist()  # [A]
        if rows == 0:
            raise TrainkitError("cannot evaluate on an empty dataset")
        raise_if_labels_outside(self.task, self.strategy, "a batch", training=False)
        results = {"loss": loss_total / weight_total if weight_total else math.nan}
        results.update(metrics.results(self.strategy.sum_over_ranks, device=self.device))  # [A]
        results.update(self.task.derived(results))
        return results

    def _pieces(self, forward: Callable[..., Any], batch: Batch) -> Iterator[tuple[Batch, StepOutput]]:
        """(piece, step output) for an evaluation batch: the whole batch, or after running out of
        memory, pieces of half the rows (and half again...) from then on."""
        for piece in split_micro_batches([batch], self.backoff.eval_micro_batch_size):
            try:
                piece = to_device(piece, self.device, self.memory_format)
                with self.autocast():
                    output = self.task.step(forward, piece)
            except torch.OutOfMemoryError:
                output = None  # the traceback holds the partial forward: handled after leaving this block
            if output is not None:
                yield piece, output
                continue
            self.backoff.halve_evaluation(batch_rows(piece))
            yield from self._pieces(forward, piece)

    @torch.inference_mode()
    def predict(self, forward: Callable[..., Any], data: Any, batch_size: int) -> Any:
        """``forward``'s outputs for ``data`` (a tensor of inputs, or evaluation data whose targets
        are ignored), concatenated along the first dimension in host memory."""
        outputs = []
        for inputs, counted in self.strategy.in_lockstep(self._inputs(data, batch_size)):  # [A] FSDP: in lockstep
            with self.autocast():
                produced = self.task.forward(forward, to_device(inputs, self.device, self.memory_format))
            if not counted:
                continue
            logits = model_logits(produced) if model_loss(produced) is not None else produced
            # on the host as they come: device memory does not grow with the data, and the result is NumPy-ready
            outputs.append(to_host(map_tensors(lambda t: t.float() if t.is_floating_point() else t, logits)))
        if not outputs:
            raise TrainkitError("predict() got no data")
        return concatenate(outputs)

    def _inputs(self, data: Any, batch_size: int) -> Iterator[Any]:
        if isinstance(data, torch.Tensor):
            for start in range(0, len(data), batch_size):
                yield data[start : start + batch_size]
            return
        for batch in self.batches(data):
            yield self.task.split(batch)[0]


def raise_if_labels_outside(task: Task, strategy: Strategy, batches: str, *, training: bool) -> LabelsSeen | None:
    """One DataError when the label guard saw a label outside the model's classes (on any rank:
    all ranks stop together); returns what it saw (None: nothing, or a task without the guard)."""
    if task.label_guard is None:  # the same on every rank: no collective needed
        return None
    seen = task.labels_seen(training)
    problem = None if seen is None else seen.out_of_range()
    if strategy.any_rank(problem is not None)[0]:  # [A]
        raise DataError(f"{batches} holds {problem or 'a label outside the model classes (on another rank)'}")
    return seen
