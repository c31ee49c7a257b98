"""Data-parallel helpers: the few torch.distributed calls trainkit needs, in one place.

``--strategy ddp`` runs one process per device under ``torchrun``, which sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. The model is wrapped in
``torch.nn.parallel.DistributedDataParallel`` (see trainkit.distributed.strategies); everything here is
what the rest of the loop needs around it:

* ``process_group``: init/destroy the default group. On CUDA it serves both kinds of tensor
  (``"cuda:nccl,cpu:gloo"``, as torchtitan does): FSDP's CPU offload reduces host gradients and
  norms. A second, gloo group carries the small *decisions* (stop? save failed? which
  metrics?), so agreeing on a Python flag never needs a GPU sync.
* ``all_reduce_sum`` for metric sums; ``any_rank``/``every_rank`` for flags that must be the
  same everywhere (interrupts, NaN checks, "are the weights finite?"); ``broadcast_object``
  for rank 0's decisions (early stopping, checkpoint paths); ``gather_objects`` for per-rank
  state that a checkpoint must hold (RNG streams, running metric sums).

Every helper is a no-op (returns its input) when no process group is active, so
single-process code calls them unconditionally. Collectives must be called by all ranks in
the same order: the trainer calls each of them on every rank, and only the file writes
themselves are guarded by ``is_main()``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import cache
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from trainkit.errors import ConfigError

log = logging.getLogger("trainkit")

STRATEGIES = ("auto", "single", "ddp", "fsdp")  # fsdp: trainkit.distributed.fsdp
LAUNCH_HINT = "torchrun --nproc_per_node N -m trainkit train ..."

T = TypeVar("T")
_control_group: Any = None  # gloo group for CPU-side decisions (None: the default group)
_oom_group: Any = None  # gloo group only ranks that ran out of memory call into (see every_rank_out_of_memory)
# How long a rank that ran out of memory waits for the others to say they did too. Ranks with the
# same shapes run out at the same step within milliseconds; a rank alone is not waited for longer.
OOM_AGREEMENT_S = 60.0


# ------------------------------------------------------------- environment
def launched_by_torchrun() -> bool:
    """torchrun (and torch.distributed.run) export these for every worker."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def env_rank() -> int:
    """This process's global rank from the launcher's environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_strategy(strategy: str) -> str:
    """'auto' is ddp when a launcher started several processes, else single; ddp and fsdp need torchrun."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if strategy == "auto":
        return "ddp" if launched_by_torchrun() and env_world_size() > 1 else "single"
    if strategy in ("ddp", "fsdp") and not launched_by_torchrun():
        raise ConfigError(f"--strategy {strategy} needs one process per device: launch with "
                          f"`{LAUNCH_HINT} --strategy {strategy}`")  # fmt: skip
    return strategy


def ddp_device(device: torch.device) -> torch.device:
    """The device of this rank: one GPU per process, else the CPU.

    ``cuda:LOCAL_RANK`` among the GPUs this process sees, modulo their number: where a scheduler
    gives each task only its own GPU (SLURM ``--gpus-per-task=1``, Kubernetes), every rank sees
    one, ``cuda:0``. A single process keeps the ``cuda:N`` it was given.
    """
    if device.type != "cuda":
        return device
    if device.index is not None:
        if env_world_size() > 1:
            raise ConfigError(f"--device {device} under ddp: each rank uses its own GPU (LOCAL_RANK); "
                              f"pass --device cuda or auto")  # fmt: skip
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def backend_for(device: torch.device) -> str:
    """The default group's backend: NCCL for CUDA tensors and gloo for host tensors on a GPU run
    (one backend alone refuses the other kind: "No backend type associated with device type cpu");
    gloo for a CPU run."""
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed, so dropout masks differ between ranks (a function of (seed, rank) alone)."""
    digest = hashlib.blake2b(f"trainkit-rank:{seed}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


# ----------------------------------------------------------- process group
@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the torchrun job for the duration of the block (see ``backend_for``)."""
    global _control_group, _oom_group
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device), device_id=device)
        _control_group = dist.new_group(backend="gloo")
    else:
        dist.init_process_group(backend_for(device))
    _oom_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=OOM_AGREEMENT_S))
    level = log.level
    if dist.get_rank() != 0:
        log.setLevel(logging.ERROR)  # rank 0 logs; the others only report errors
    try:
        yield
    finally:
        log.setLevel(level)
        _control_group = _oom_group = None
        dist.destroy_process_group()


def is_active() -> bool:
    """True inside ``process_group``: the trainer then wraps the model in DDP."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Rank 0 logs and writes every file; the other ranks write nothing."""
    return rank() == 0


# ------------------------------------------------------------- collectives
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (device tensors: runs on NCCL or gloo)."""
    if is_active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    if is_active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on at least one (e.g. a signal reached one rank)."""
    if not is_active():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(value.item())


def any_ranks(*flags: bool) -> tuple[bool, ...]:
    """Several ``any_rank`` flags agreed in one collective (the loop asks two questions per step)."""
    if not is_active():
        return flags
    value = torch.tensor([int(flag) for flag in flags], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_control_group)
    return tuple(bool(v) for v in value.tolist())


def every_rank_out_of_memory() -> bool:
    """Called by a rank that ran out of memory: True when every rank did (at the same step: each
    calls this once), so all can retry in step; False when the others went on without it within
    OOM_AGREEMENT_S (they are inside this step's collectives, waiting for this rank)."""
    if not is_active():
        return True
    try:
        dist.all_reduce(torch.ones(1), group=_oom_group)
    except RuntimeError:  # gloo's timeout: no other rank joined
        return False
    return True


def every_rank(flag: bool) -> bool:
    """True on every rank only when it is True on all of them."""
    return not any_rank(not flag)


def broadcast_object(value: T, src: int = 0) -> T:
    """Rank ``src``'s value on every rank (picklable objects: decisions, paths, metric dicts)."""
    if not is_active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, group=_control_group)
    return box[0]


def gather_objects(value: T) -> list[T]:
    """Every rank's value, in rank order, on every rank."""
    if not is_active():
        return [value]
    found: list[Any] = [None] * world_size()
    dist.all_gather_object(found, value, group=_control_group)
    return found


def barrier() -> None:
    """Wait until every rank got here (e.g. all ranks checked --out before rank 0 writes to it)."""
    if is_active():
        dist.barrier(group=_control_group)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running stats), e.g. before evaluation."""
    if not is_active():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)


# ------------------------------------------------------- --sync-batchnorm
class ChannelsLastInput:
    """Mixin for a BatchNorm over the channels of (B, T, C) activations: it normalises (B, C, T).
    ``sync_batchnorm`` keeps it when it swaps the BatchNorm for a synchronised one, so the synced
    norm sees the same layout (the text models' TokenBatchNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch of every process.

    torch.nn.SyncBatchNorm, which trainkit uses on CUDA, refuses CPU tensors; this is the same
    computation for gloo: per-channel sums, sums of squares and the count are all-reduced with
    torch.distributed.nn's differentiable all_reduce (its backward all-reduces the gradient, as
    SyncBatchNorm's does), so every rank normalises with the global mean and variance and keeps
    the same running statistics. Parameters, buffers and state_dict keys are BatchNorm's.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of (N, C, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_active() and world_size() > 1):
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        channels, x = input.shape[1], input.float()
        dims = [0, *range(2, input.dim())]
        count = torch.full((1,), input.numel() / channels, device=input.device)
        total = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels : 2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach() * n / (n - 1).clamp_min(1))
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), momentum)


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """--sync-batchnorm: every BatchNorm of ``model`` computes global-batch statistics (CUDA: torch's
    SyncBatchNorm; CPU: GlobalBatchNorm). Parameters and buffers are kept, so an optimizer built
    on the model, and its checkpoints, stay valid; a norm over (B, T, C) activations
    (``ChannelsLastInput``, the text models' TokenBatchNorm) keeps its transpose."""
    return _with_synced_batchnorm(model, torch.nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm)


@cache
def _channels_last_variant(synced: type) -> type:
    return type(f"ChannelsLast{synced.__name__}", (ChannelsLastInput, synced), {})


def _with_synced_batchnorm(module: torch.nn.Module, synced_class: type) -> torch.nn.Module:
    """``module`` with each BatchNorm replaced by ``synced_class`` holding the same tensors (what
    torch's convert_sync_batchnorm does, for both classes and for ChannelsLastInput norms)."""
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, synced_class):
        cls = _channels_last_variant(synced_class) if isinstance(module, ChannelsLastInput) else synced_class
        synced = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:  # the same tensors, as torch's convert_sync_batchnorm keeps them
            synced.weight, synced.bias = module.weight, module.bias
        synced.running_mean, synced.running_var = module.running_mean, module.running_var
        synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        converted = _with_synced_batchnorm(child, synced_class)
        if converted is not child:
            setattr(module, name, converted)
    return module
