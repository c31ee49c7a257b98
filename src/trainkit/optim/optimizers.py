"""Optimizers with weight decay only where it belongs.

Decoupled weight decay pulls weights towards zero. On biases and on normalisation
scales/shifts that only hurts: it fights the very offsets and gains those parameters
exist to learn. So parameters are split into two groups and only matrices/kernels decay.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainkit.errors import ConfigError

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# How --lr follows the batch size: exponent of (effective batch / reference batch).
LR_SCALINGS = {"sqrt": 0.5, "linear": 1.0}


def batch_scaled_lr(lr: float, batch: int, reference: int, rule: str | None) -> float:
    """The lr for ``batch`` when ``lr`` was chosen for ``reference``: linear (Goyal et al. 2017, for
    SGD) or square-root scaling (the usual rule for Adam); ``rule`` None keeps ``lr``."""
    if rule is None:
        return lr
    if rule not in LR_SCALINGS:
        raise ConfigError(f"--lr-scaling must be one of {', '.join(LR_SCALINGS)}; got {rule!r}")
    return lr * (batch / reference) ** LR_SCALINGS[rule]


def split_decay_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Return (decay, no_decay): biases, 1-d parameters and norm-layer parameters never decay."""
    no_decay_ids = {
        id(p) for module in model.modules() if isinstance(module, NORM_TYPES) for p in module.parameters(recurse=False)
    }
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or id(param) in no_decay_ids:
            no_decay.append(param)
        else:
            decay.append(param)
    return decay, no_decay


def build_optimizer(
    name: str, model: nn.Module, *, lr: float, weight_decay: float, momentum: float = 0.9, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW or SGD+Nesterov momentum over two parameter groups (decay / no decay).

    ``fused``: AdamW's fused kernel instead of foreach: 4x faster steps for the text Transformer's
    many small tensors, no gain on the MNIST models (docs/benchmarks.md).
    """
    decay, no_decay = split_decay_parameters(model)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **({"fused": True} if fused else {"foreach": True}))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, foreach=True)
    raise ConfigError(f"unknown optimizer {name!r}; choose adamw or sgd")


def check_user_optimizer(optimizer: Any, scheduler: Any, model: nn.Module) -> None:
    """A user's optimizer must train this model's parameters; a scheduler must drive that optimizer."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable and not any(id(p) in held for p in trainable):
        raise ConfigError("the optimizer holds none of the model's parameters: build it from model.parameters() "
                          "after the model is created (and before it is wrapped)")  # fmt: skip
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ConfigError("a ReduceLROnPlateau scheduler needs the monitored metric: use TrainConfig(schedule='plateau')")
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise ConfigError(f"scheduler must be a torch.optim.lr_scheduler.LRScheduler, got {type(scheduler).__name__}")
    if scheduler.optimizer is not optimizer:
        raise ConfigError("the scheduler drives another optimizer than the Trainer's: build it on the same optimizer")
