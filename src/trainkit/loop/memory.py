"""Memory: measure a training step's peak and find the largest batch that fits (``--batch-size auto``).

On CUDA the finder tries real training steps (forward, backward, optimizer step) at growing
powers of two: nothing predicts the caching allocator, cuDNN workspaces and fragmentation better
than running the step. A size fits when its step's peak (``max_memory_allocated`` after a reset)
stays within the free memory less ``CUDA_HEADROOM`` and the weight copies the run will hold
beside the model (an EMA or SWA average, early stopping's best weights): a size that only just
ran would run out of memory later, in evaluation or at the first larger batch.
On CPU, running out of memory is not an exception but swapping or the OOM killer, so the
finder measures the peak bytes of a real step at two small batch sizes, extrapolates the
(linear) per-sample cost and picks the largest power of two that stays within a budget.
Either way the model's weights, buffers and the RNG are restored: the search leaves no trace.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import default_collate

from trainkit.config.schema import TrainConfig
from trainkit.devices import module_device, restore_rng, rng_state
from trainkit.errors import ConfigError, TrainkitError
from trainkit.optim.optimizers import build_optimizer
from trainkit.data.runtime import to_device
from trainkit.tasks.base import Task

log = logging.getLogger("trainkit")

GiB = 1024**3
MiB = 1024**2
# Beyond a few thousand samples per step the MNIST-sized models here gain nothing: 55,000
# images give 13 optimizer steps per epoch at 4096 (fewer steps hurt a fixed epoch budget),
# the recipe's lr (tuned at 128) would need rescaling, and a CPU step is compute-bound long before.
MAX_AUTO_BATCH = 4096
# Half of the free RAM: room for evaluation batches, allocator caching, other processes and
# the extrapolation's error.
DEFAULT_BUDGET_FRACTION = 0.5
PROBE_BATCHES = (16, 64)  # the two CPU measurements the per-sample cost is extrapolated from
# Free device memory a CUDA search leaves unused: allocator fragmentation, evaluation batches and
# what other libraries allocate later (cuDNN/cuBLAS workspaces grow with the first larger shapes).
CUDA_HEADROOM = 0.15
# Bytes per parameter a training step keeps: the weight, its gradient and the optimizer state
# (AdamW: two moments; SGD with momentum: one buffer), all fp32.
STATE_BYTES_PER_PARAMETER = {"adamw": 16, "sgd": 12}


@dataclass(frozen=True)
class BatchSizeChoice:
    """The chosen batch size and, for the log, why."""

    batch_size: int
    reason: str


# ----------------------------------------------------------------- measuring


def available_memory_bytes() -> int:
    """RAM that can be allocated without swapping: MemAvailable from /proc/meminfo (Linux), else free pages."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_memory_budget() -> int:
    """Bytes a CPU training step may use when --memory-budget is not given."""
    return int(available_memory_bytes() * DEFAULT_BUDGET_FRACTION)


@dataclass(frozen=True)
class StepMemory:
    """Bytes allocated by one training step above what was allocated before it.

    ``forward_backward``: the live bytes after each allocator event of forward+backward
    (activations, which grow with the batch, and the new gradients); ``optimizer``: the peak
    of the optimizer step (the gradients plus its state and temporaries, a constant).
    """

    forward_backward: tuple[int, ...]
    optimizer: int

    @property
    def forward_backward_peak(self) -> int:
        return max(self.forward_backward, default=0)

    @property
    def peak(self) -> int:
        return max(self.forward_backward_peak, self.optimizer)


def live_bytes(step: Callable[[], object]) -> tuple[int, ...]:
    """CPU bytes allocated by ``step`` above the level when it started, after each allocator event.

    Reads the profiler's allocation events (``profile_memory``): every allocation and free
    of the CPU tensor allocator, in order, which is what activations, gradients and optimizer
    state are made of. Peak RSS would also count the torch libraries, glibc's caching and the
    interpreter, and moves in coarse steps.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(_allocation_events(prof.profiler.kineto_results.experimental_event_tree()))
    return tuple(itertools.accumulate(size for _, size in events))


def _allocation_events(nodes: list) -> Iterator[tuple[int, int]]:
    """(time ns, bytes; negative for a free) of every CPU allocator event in the profiler's tree."""
    for node in nodes:
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            yield node.start_time_ns, fields.alloc_size
        yield from _allocation_events(node.children)


def forward_backward(
    model: nn.Module, inputs: Any, targets: torch.Tensor | None, amp_dtype: torch.dtype | None = None,
    task: Task | None = None,
) -> None:  # fmt: skip
    """Cross-entropy on (inputs, targets), or with ``task`` its step on ``inputs`` as a whole batch
    (``targets`` None: a user's Dataset, see DatasetPrefix)."""
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with autocast:
        if task is None:
            loss = nn.functional.cross_entropy(model(inputs), targets)
        else:
            loss = task.step(model, inputs if targets is None else (inputs, targets)).loss
    loss.backward()


class DatasetPrefix:
    """A map-style Dataset's first samples as one batch on the device: what the batch-size search
    slices (``prefix[:n]``) when the data is not a pair of tensors."""

    def __init__(self, dataset: Any, device: torch.device) -> None:
        self.dataset, self.device = dataset, device

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, rows: slice) -> Any:
        samples = [self.dataset[i] for i in range(*rows.indices(len(self.dataset)))]
        return to_device(default_collate(samples), self.device)


def _prefix(y: torch.Tensor | None, size: int) -> torch.Tensor | None:
    return None if y is None else y[:size]


def measure_step_memory(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    amp_dtype: torch.dtype | None = None,
    task: Task | None = None,
) -> StepMemory:
    """Run one real training step on CPU and record its memory by phase."""
    optimizer.zero_grad(set_to_none=True)
    timeline = live_bytes(lambda: forward_backward(model, inputs, targets, amp_dtype, task))
    optimizer_timeline = live_bytes(optimizer.step)
    optimizer.zero_grad(set_to_none=True)
    gradients = timeline[-1] if timeline else 0  # still allocated when the optimizer step starts
    return StepMemory(forward_backward=timeline, optimizer=gradients + max(optimizer_timeline, default=0))


def predicted_peak(small: StepMemory, small_size: int, large: StepMemory, large_size: int, size: int) -> float:
    """Peak bytes of a step at batch ``size``, from measurements at two smaller sizes.

    The same ops run in the same order at every batch size, so the live bytes after the
    i-th allocator event are a_i + b_i * batch: solve each event's line from the two
    measurements and take the maximum over events. This catches a peak that moves, e.g.
    from the end of backward (all gradients) at small batches to its start (all activations)
    at large ones, which extrapolating the two peaks would miss. If the allocation sequences
    differ, fall back to scaling the larger measurement in proportion: an upper bound.
    """
    if len(small.forward_backward) != len(large.forward_backward):
        backward = large.forward_backward_peak * max(1.0, size / large_size)
    else:
        backward = max(
            (a + (b - a) * (size - small_size) / (large_size - small_size)
             for a, b in zip(small.forward_backward, large.forward_backward)),
            default=0.0,
        )  # fmt: skip
    return max(backward, small.optimizer, large.optimizer)


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    amp_dtype: torch.dtype | None = None,
    task: Task | None = None,
) -> None:
    """One plain step (forward, backward, optimizer step): what the memory search tries."""
    optimizer.zero_grad(set_to_none=True)
    forward_backward(model, inputs, targets, amp_dtype, task)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextmanager
def leaves_no_trace(model: nn.Module) -> Iterator[None]:
    """Restore the model's weights, buffers (BatchNorm statistics), mode and the RNG afterwards."""
    state = copy.deepcopy(model.state_dict())
    training = model.training
    device = module_device(model)
    rng = rng_state(device)
    try:
        yield
    finally:
        model.load_state_dict(state)
        model.train(training)
        restore_rng(rng, device)


@dataclass(frozen=True)
class MemoryEstimate:
    """What a model needs to train, estimated from shapes alone (no memory is allocated)."""

    parameters: int
    state_bytes: int  # weights, gradients, optimizer state and buffers
    activation_bytes: int  # outputs of every layer at the batch size, kept for backward

    @property
    def total(self) -> int:
        return self.state_bytes + self.activation_bytes


def estimate_training_memory(build: Callable[[], nn.Module], optimizer: str) -> MemoryEstimate:
    """Weights, gradients, optimizer state and buffers of the model ``build`` makes, counted on
    the meta device: shapes only, nothing allocated, so a 10^9-wide layer is measured, not built."""
    with torch.device("meta"):
        model = build()
    parameters = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return MemoryEstimate(parameters, parameters * STATE_BYTES_PER_PARAMETER.get(optimizer, 16) + buffers, 0)


def activation_bytes_per_sample(model: nn.Module, sample: torch.Tensor) -> int:
    """Bytes of every layer's output for one sample: what a training forward keeps per sample.

    One eval-mode forward without autograd (BatchNorm cannot train on one sample), leaving
    the model's mode, buffers and the RNG as they were. (A forward on the meta device would
    cost seconds of imports at every start.)
    """
    total = [0]

    def count(module: nn.Module, inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [leaf.register_forward_hook(count) for leaf in leaves]
    training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            model(sample[:1])
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return total[0]


def device_memory_bytes(device: torch.device) -> int:
    """Memory a run on ``device`` can still allocate."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory_bytes()


def check_model_fits(estimate: MemoryEstimate, device: torch.device, *, batch_size: int, hint: str) -> None:
    """Refuse, before anything is allocated, a model that cannot fit; the estimate is named."""
    available = device_memory_bytes(device)
    if estimate.total <= available:
        return
    activations = (f", {estimate.activation_bytes / GiB:,.1f} GiB of activations at batch {batch_size}"
                   if estimate.activation_bytes else "")  # fmt: skip
    raise ConfigError(
        f"the model would need about {estimate.total / GiB:,.1f} GiB on {device} ({estimate.parameters:,} parameters: "
        f"{estimate.state_bytes / GiB:,.1f} GiB for weights, gradients and optimizer state{activations}) but "
        f"{available / GiB:,.1f} GiB is available; {hint}"
    )


# ----------------------------------------------------------------- choosing


def largest_power_of_two_at_most(limit: int) -> int:
    return 1 << (int(limit).bit_length() - 1)


def largest_fitting_power_of_two(fits: Callable[[int], bool], cap: int, start: int = 1) -> int:
    """Try start, 2 * start, ... up to ``cap``; the last size that fit (0 if even ``start`` does not)."""
    best, size = 0, start
    while size <= cap and fits(size):
        best, size = size, size * 2
    return best


def largest_power_of_two_within(peak: Callable[[int], float], budget: float, cap: int) -> int:
    """Largest power of two b <= cap with peak(b) <= budget (0 if none); peak grows with b."""
    return largest_fitting_power_of_two(lambda size: peak(size) <= budget, cap)


def batch_cap(num_samples: int, maximum: int = MAX_AUTO_BATCH) -> int:
    """The largest power of two that is at most the training set size and ``maximum``."""
    return largest_power_of_two_at_most(max(1, min(num_samples, maximum)))


# ------------------------------------------------------------------- finding


class CudaMemory:
    """What the trial search reads on a CUDA device: the bytes this process can still allocate, and
    a step's peak above what was allocated before it (the allocator's own counters)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def free(self) -> int:
        """The device's free memory plus the allocator's cached blocks, within the process's
        ``set_per_process_memory_fraction`` (a GPU shared with other jobs)."""
        free, total = torch.cuda.mem_get_info(self.device)
        allocated = torch.cuda.memory_allocated(self.device)
        available = free + torch.cuda.memory_reserved(self.device) - allocated
        return min(available, int(torch.cuda.get_per_process_memory_fraction(self.device) * total) - allocated)

    def step_peak(self, step: Callable[[], object]) -> int:
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        step()
        return torch.cuda.max_memory_allocated(self.device) - before

    def release(self) -> None:
        torch.cuda.empty_cache()


def find_batch_size_by_trial(
    model: nn.Module, make_optimizer: Callable[[], torch.optim.Optimizer], x: Any, y: torch.Tensor | None,
    *, cap: int, amp_dtype: torch.dtype | None = None, task: Task | None = None, weight_copies: int = 0,
    memory: Any = None,
) -> BatchSizeChoice:  # fmt: skip
    """CUDA: real steps at 2, 4, 8, ...; a size fits when its step ran and its peak stays within the
    budget (free memory less ``weight_copies`` copies of the model's state, less CUDA_HEADROOM).
    ``memory``: what reads the device's memory (default CudaMemory; tests pass a stand-in)."""
    memory = memory if memory is not None else CudaMemory(x.device)
    copies = weight_copies * state_bytes(model)
    budget = int((memory.free() - copies) * (1 - CUDA_HEADROOM))

    def fits(size: int) -> bool:
        with leaves_no_trace(model):
            optimizer = make_optimizer()
            try:
                step = lambda: training_step(model, optimizer, x[:size], _prefix(y, size), amp_dtype=amp_dtype, task=task)  # noqa: E731
                return memory.step_peak(step) <= budget
            except torch.OutOfMemoryError:
                pass  # the traceback holds the step's tensors: free them after leaving this block
            finally:
                optimizer.zero_grad(set_to_none=True)
        memory.release()
        return False

    best = largest_fitting_power_of_two(fits, cap, start=min(2, cap))  # BatchNorm cannot train on 1 sample
    held = f" beside {weight_copies} copies of the weights" if weight_copies else ""
    if best == 0:
        raise TrainkitError(
            f"--batch-size auto: even a batch of {min(2, cap)} does not fit on {x.device}{held} with "
            f"{CUDA_HEADROOM:.0%} of the free memory left over; add --grad-checkpointing, use --precision bf16 "
            f"or a smaller model"
        )
    if best == cap:
        why = f"{best} fit on {x.device}{held} and is the cap (training set size, at most {MAX_AUTO_BATCH})"
        return BatchSizeChoice(best, why)
    return BatchSizeChoice(best, f"{best * 2} did not fit on {x.device}{held} in a real training step with "
                                 f"{CUDA_HEADROOM:.0%} of the free memory left over; {best} fit")  # fmt: skip


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict: what one copy of its weights (an average, a best-weights copy) holds."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def weight_copies_of(config: TrainConfig) -> int:
    """Copies of the weights a run keeps on the device beside the model: the EMA or SWA average and early
    stopping's best weights. (Rollback's fallback state is kept in host memory.)"""
    return int(config.ema is not None or config.swa_start is not None) + int(config.patience > 0)


def find_batch_size_in_budget(
    model: nn.Module, make_optimizer: Callable[[], torch.optim.Optimizer], x: Any, y: torch.Tensor | None,
    *, cap: int, budget: int, amp_dtype: torch.dtype | None = None, task: Task | None = None,
) -> BatchSizeChoice:  # fmt: skip
    """CPU: extrapolate a real step's memory from two small batches; stay within ``budget`` bytes."""
    small, large = probe_batches(len(x))

    def measure(size: int) -> StepMemory:
        with leaves_no_trace(model):
            return measure_step_memory(model, make_optimizer(), x[:size], _prefix(y, size), amp_dtype=amp_dtype, task=task)

    at_small, at_large = measure(small), measure(large)

    def peak(size: int) -> float:
        return predicted_peak(at_small, small, at_large, large, size)

    best = largest_power_of_two_within(peak, budget, cap)
    measured = (
        f"a training step measured {at_small.peak / MiB:.1f} MiB at batch {small} and "
        f"{at_large.peak / MiB:.1f} MiB at {large}"
    )
    if best == 0:
        raise TrainkitError(
            f"--batch-size auto: {measured}; even a batch of 1 exceeds the --memory-budget of {budget / GiB:.2f} GiB; "
            f"raise --memory-budget, add --grad-checkpointing or use a smaller model"
        )
    if best == cap:
        why = f"the cap (training set size, at most {MAX_AUTO_BATCH}), predicted to need {peak(best) / GiB:.2f} GiB"
    else:
        why = (
            f"the largest power of two within the {budget / GiB:.2f} GiB memory budget (predicted "
            f"{peak(best) / GiB:.2f} GiB; {best * 2} would need {peak(best * 2) / GiB:.2f} GiB)"
        )
    return BatchSizeChoice(best, f"{measured}; {best} is {why}")


def probe_batches(num_samples: int) -> tuple[int, int]:
    """Two distinct small batch sizes the data can supply."""
    large = max(2, min(PROBE_BATCHES[1], num_samples))
    small = max(1, min(PROBE_BATCHES[0], large // 2))
    return small, large


def find_batch_size(
    model: nn.Module,
    config: TrainConfig,
    x: Any,
    y: torch.Tensor | None,
    *,
    amp_dtype: torch.dtype | None = None,
    task: Task | None = None,
) -> BatchSizeChoice:
    """The largest power-of-two micro-batch of ``model`` that fits, capped at len(x) and MAX_AUTO_BATCH.

    ``x``, ``y``: training tensors on the training device; or ``x`` a ``DatasetPrefix`` of the
    user's Dataset, ``y`` None and ``task`` the run's task. Model and RNG are left as they were.
    """
    cap = batch_cap(len(x))
    lr = 1e-3 if config.lr == "auto" else config.lr

    def make_optimizer() -> torch.optim.Optimizer:
        return build_optimizer(config.optimizer, model, lr=lr, weight_decay=config.weight_decay,
                               momentum=config.momentum, fused=config.fused_optimizer)  # fmt: skip

    if x.device.type == "cuda":
        return find_batch_size_by_trial(model, make_optimizer, x, y, cap=cap, amp_dtype=amp_dtype, task=task,
                                        weight_copies=weight_copies_of(config))  # fmt: skip
    budget = int(config.memory_budget * GiB) if config.memory_budget is not None else default_memory_budget()
    return find_batch_size_in_budget(model, make_optimizer, x, y, cap=cap, budget=budget, amp_dtype=amp_dtype, task=task)
