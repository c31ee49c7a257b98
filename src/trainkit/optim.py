"""Optimizers with weight decay only where it belongs.

Decoupled weight decay pulls weights towards zero. On biases and on normalisation
scales/shifts that only hurts: it fights the very offsets and gains those parameters
exist to learn. So parameters are split into two groups and only matrices/kernels decay.
"""

from __future__ import annotations

import torch
from torch import nn

from trainkit.errors import ConfigError

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


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
    name: str, model: nn.Module, *, lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """AdamW or SGD+Nesterov momentum over two parameter groups (decay / no decay)."""
    decay, no_decay = split_decay_parameters(model)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, foreach=True)
    raise ConfigError(f"unknown optimizer {name!r}; choose adamw or sgd")
