"""--strategy fsdp: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) for models past one device.

Each process keeps 1/N of every parameter, gradient and optimizer state (DTensors sharded on
dim 0); a unit's full parameters exist only while its forward/backward runs (all-gathered,
then freed), and gradients are reduce-scattered (averaged over ranks, as DDP's all-reduce).
``shard_model`` shards each block (see ``shard_units``), then the root, so parameters that
belong to no block (and tied weights) are sharded with the root.

What the rest of trainkit needs around sharded parameters lives here: reading a value that
is a DTensor (``full_value``: a collective, ``local_value``: this rank's shard), the gradient
sync switch for accumulation, and the model/optimizer state in the form that
``torch.distributed.checkpoint`` reshards (``sharded_state``/``restore_sharded_state``), or
gathered whole on rank 0 (``full_model_state``) for the exports. Memory and step time against
DDP: docs/scaling.md ("FSDP").
"""

from __future__ import annotations

import ctypes
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
from torch import nn

from trainkit import distributed
from trainkit.errors import ConfigError, TrainkitError

PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


@cache
def dtensor_type() -> type:
    """DTensor, imported on first use (every step's gradient norm asks; most runs never shard)."""
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """True for a model that ``shard_model`` (or any fully_shard) wrapped."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def holds_dtensors(state: Any) -> bool:
    """Whether a (nested) state holds DTensors: it is then saved sharded, through DCP."""
    if isinstance(state, dict):
        return any(holds_dtensors(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return any(holds_dtensors(value) for value in state)
    return isinstance(state, dtensor_type())


# ------------------------------------------------------------------ wrapping
def shard_units(model: nn.Module, names: Sequence[str] | None = None) -> list[nn.Module]:
    """The modules ``fully_shard`` wraps before the root.

    ``names`` (``--fsdp-units``): submodule paths; a ModuleList/Sequential/ModuleDict named
    means each of its children. Default: the children of the model's containers (a
    Transformer's ``blocks``, a Sequential model's layers): those are called as modules. Other
    top-level modules stay with the root, since a parent may read their weights directly (a
    position embedding's ``.weight[:T]``), which a unit of their own would leave sharded. Units
    without parameters are skipped, and so are units sharing a parameter with another (tied
    weights: FSDP needs them in one unit, so they go with the root).
    """
    if names:
        found = dict(model.named_modules())
        missing = [name for name in names if name not in found]
        if missing:
            raise ConfigError(f"--fsdp-units {', '.join(missing)}: no such submodule; this model has "
                              f"{', '.join(name for name, _ in model.named_children())} at the top")  # fmt: skip
        picked = [found[name] for name in names]
    else:
        picked = [model] if isinstance(model, CONTAINERS) else [c for c in model.children() if isinstance(c, CONTAINERS)]
    units = [child for module in picked for child in (module.children() if isinstance(module, CONTAINERS) else [module])]
    units = [unit for unit in units if unit is not model and any(True for _ in unit.parameters())]
    holders = Counter(id(param) for unit in units for param in unit.parameters())  # >1: a tied parameter
    return [unit for unit in units if all(holders[id(param)] == 1 for param in unit.parameters())]


def check_offload(offload: bool, device: torch.device) -> None:
    """--fsdp-offload moves shards off a GPU; on a CPU run there is nowhere to move them."""
    if offload and device.type != "cuda":
        raise ConfigError(f"--fsdp-offload keeps shards in CPU memory between a GPU's uses; on {device} "
                          f"they are there already: drop --fsdp-offload")  # fmt: skip


def keep_large_allocations_out_of_the_heap() -> None:
    """CPU runs: FSDP frees and re-allocates every unit's unsharded parameters and gradients each
    step. glibc raises its mmap threshold after such frees, so these buffers move into the heap,
    which fragments: a process's memory then grows past DDP's (measured in docs/scaling.md,
    "FSDP"). A fixed 1 MiB threshold (``mallopt(M_MMAP_THRESHOLD)``, what
    ``MALLOC_MMAP_THRESHOLD_`` sets) keeps them mmapped and returned to the OS. No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def shard_model(model: nn.Module, *, precision: str, offload: bool, units: Sequence[str] | None = None) -> nn.Module:
    """``fully_shard`` each unit, then the root, in place; returns the model (now an FSDPModule).

    bf16/fp16: FSDP's MixedPrecisionPolicy computes in that dtype, reduces gradients in fp32 and
    hands fp32 outputs to the loss (the trainer then runs no autocast). ``offload``: the shards
    and optimizer state live in CPU memory, copied to the device for each unit's use.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    dtype = PARAM_DTYPES.get(precision)
    reduce = torch.float32 if dtype else None
    # units compute in dtype and pass dtype on; BatchNorm's running statistics are fp32, so its unit
    # computes in fp32 and hands dtype back; the root hands fp32 to the loss
    unit_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce)
    norm_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=reduce, output_dtype=dtype)
    root_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce, output_dtype=reduce)
    offload_policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if dtype is not None:
        for norm in norms:
            fully_shard(norm, mp_policy=norm_policy, offload_policy=offload_policy)
    for unit in shard_units(model, units):
        if dtype is None or unit not in norms:
            fully_shard(unit, mp_policy=unit_policy, offload_policy=offload_policy)
    fully_shard(model, mp_policy=root_policy, offload_policy=offload_policy)
    return model


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Accumulation: reduce-scatter gradients only in the group's last backward (the others keep
    unsharded gradients to add to), as DDP's no_sync."""
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ---------------------------------------------------------------- reading values
def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (a collective: every rank calls it); other tensors as they are."""
    return tensor.full_tensor() if isinstance(tensor, dtensor_type()) else tensor


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (no communication); other tensors as they are."""
    return tensor.to_local() if isinstance(tensor, dtensor_type()) else tensor


def local_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: local_value(value) for key, value in state.items()}


def in_lockstep(batches: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """(batch, counted) pairs for evaluation. Every forward of a sharded model is a collective (it
    all-gathers the parameters), so the ranks run as many as the rank with the most batches: one
    out of batches repeats its last, not counted. One small all-reduce per batch."""
    iterator, last = iter(batches), None
    while True:
        batch = next(iterator, None)
        if not distributed.any_rank(batch is not None):  # FSDP agreement point: does any rank go on?
            return
        if batch is None and last is None:
            raise TrainkitError(f"rank {distributed.rank()} got no evaluation batch: the evaluation data has fewer "
                                f"rows than the {distributed.world_size()} processes of --strategy fsdp")  # fmt: skip
        yield (batch, True) if batch is not None else (last, False)
        last = batch if batch is not None else last


# ------------------------------------------------------------ model + optimizer state
def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimizer state keyed by parameter names (FQNs), each rank holding its shards:
    what torch.distributed.checkpoint saves and reshards onto another number of processes.
    On an unsharded model: the same form with whole tensors."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer)


def restore_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                          optimizer_state: dict[str, Any]) -> None:  # fmt: skip
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def shard_weight_copies(callbacks: dict[str, Any], model_state: dict[str, Any]) -> dict[str, Any]:
    """The callbacks' saved states with each whole weight copy (early stopping's best weights from
    a one-file checkpoint) cut into this rank's shards the way the model's DTensors are; a
    collective (distribute_tensor)."""
    from torch.distributed.tensor import distribute_tensor

    def sharded(copy: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {key: distribute_tensor(value.to(ref.device), ref.device_mesh, ref.placements)
                if isinstance(ref, dtensor_type()) else value
                for key, value in copy.items() for ref in [model_state[key]]}  # fmt: skip

    def is_weight_copy(value: Any) -> bool:
        return isinstance(value, dict) and set(value) == set(model_state) and not holds_dtensors(value)

    return {key: {name: sharded(value) if is_weight_copy(value) else value for name, value in saved.items()}
            for key, saved in callbacks.items()}  # fmt: skip


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state_dict on rank 0's CPU (empty on the other ranks): a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
                       optimizer_state: dict[str, Any]) -> None:  # fmt: skip
    """Whole tensors (a one-file DDP or single-process checkpoint) into a sharded model: each rank
    keeps its shards. The optimizer state, keyed by parameter position, is re-keyed by name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = {id(param): name for name, param in model.named_parameters()}
    order = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
    by_name = {
        "state": {order[index]: value for index, value in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [order[index] for index in group["params"]]}
                         for group in optimizer_state["param_groups"]],
    }  # fmt: skip
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=by_name,
                   options=StateDictOptions(full_state_dict=True))  # fmt: skip
