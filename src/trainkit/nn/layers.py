"""Building blocks shared by the models: activations, norms, stochastic depth, residuals.

Every factory here takes a plain string so that models can be described in a config
file; an unknown string raises ``ConfigError`` naming the valid choices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from trainkit.errors import ConfigError

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "GROUP_NORM_GROUPS",
    "Dropout",
    "DropPath",
    "Residual",
    "activation_layer",
    "activation_name",
    "check_choice",
    "check_rate",
    "group_count",
    "norm_layer",
]


# --------------------------------------------------------------------------- checks


def check_choice(what: str, value: object, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ConfigError listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")
    return value  # type: ignore[return-value]


def check_rate(what: str, value: float) -> float:
    """Return ``value`` if it is a probability in [0, 1), else raise a ConfigError.

    1 is excluded because dropping everything leaves nothing to rescale by 1/(1-p).
    """
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{what} must be in [0, 1), got {value!r}")
    return float(value)


# ---------------------------------------------------------------------- activations

_ACTIVATION_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "selu": nn.SELU,
    "identity": lambda: IdentityActivation(),
}

ACTIVATIONS: tuple[str, ...] = tuple(_ACTIVATION_FACTORIES)


class IdentityActivation(nn.Identity):
    """An identity used *as an activation*.

    A separate class so that ``activation_name`` can tell it apart from the
    ``nn.Identity`` that ``norm_layer("none", ...)`` returns.
    """


# Checked in order; LeakyReLU etc. are not subclasses of each other, so order only
# matters for IdentityActivation vs. plain nn.Identity (the latter is never listed).
_ACTIVATION_TYPES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ReLU, "relu"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.Tanh, "tanh"),
    (nn.Sigmoid, "sigmoid"),
    (nn.SELU, "selu"),
    (IdentityActivation, "identity"),
)


def activation_layer(name: str) -> nn.Module:
    """Build a fresh activation module from its config name (see ``ACTIVATIONS``)."""
    check_choice("activation", name, ACTIVATIONS)
    return _ACTIVATION_FACTORIES[name]()


def activation_name(module: nn.Module) -> str | None:
    """The config name of an activation module, or None if it is not one we know."""
    for cls, name in _ACTIVATION_TYPES:
        if isinstance(module, cls):
            return name
    return None


# ---------------------------------------------------------------------------- norms

NORMS: tuple[str, ...] = ("batch", "layer", "group", "none")

# Preferred GroupNorm group counts, largest first. Capped at 8 so that the narrow
# layers of small MNIST-sized models still get several channels per group.
GROUP_NORM_GROUPS: tuple[int, ...] = (8, 4, 2, 1)


def group_count(num_channels: int) -> int:
    """Number of GroupNorm groups for ``num_channels``: the largest of 8, 4, 2, 1 dividing it."""
    return next(g for g in GROUP_NORM_GROUPS if num_channels % g == 0)


def norm_layer(kind: str, num_features: int, *, spatial: bool) -> nn.Module:
    """Build a normalisation layer for ``num_features`` channels.

    ``spatial=False`` is for (N, C) activations of an MLP, ``spatial=True`` for
    (N, C, H, W) feature maps. "layer" on feature maps is GroupNorm(1, C), which
    normalises over (C, H, W) per sample without fixing H and W at build time.
    """
    check_choice("norm", kind, NORMS)
    if num_features < 1:
        raise ConfigError(f"norm layer needs at least one feature, got {num_features}")
    if kind == "none":
        return nn.Identity()
    if kind == "group":
        return nn.GroupNorm(group_count(num_features), num_features)
    if spatial:
        return nn.BatchNorm2d(num_features) if kind == "batch" else nn.GroupNorm(1, num_features)
    return nn.BatchNorm1d(num_features) if kind == "batch" else nn.LayerNorm(num_features)


# ------------------------------------------------------------------ residual blocks


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU mask takes 16 random bits per element instead of ``bernoulli_``.

    CPU ``bernoulli_`` and ``torch.rand`` draw element by element: at the MNIST MLP's batch
    512 that took as long as all the matmuls of the step. One 64-bit draw here gives four
    elements' masks, 2.5x faster than ``torch.rand``'s (docs/benchmarks.md, "Fast paths").
    p is rounded to a multiple of 1/65536 and kept values are scaled by the inverse of the
    rounded keep probability, so the expected output still equals the input. On CUDA the
    fused library kernel is used unchanged.
    """

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0.0, 1.0) or inputs.is_cuda:
            return super().forward(inputs)
        keep, keep_probability = keep_mask(inputs.shape, self.p, inputs.device)
        return inputs * keep.to(inputs.dtype).mul_(1.0 / keep_probability)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A mask keeping each element with probability ~1 - p, and that probability exactly."""
    count = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, (-(-count // 4),), dtype=torch.int64, device=device)
    dropped = min(round(p * 65536), 65535)  # of the 65536 values an int16 can take
    keep = words.view(torch.int16)[:count].view(shape) >= dropped - 32768
    return keep, 1.0 - dropped / 65536


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a whole sample's residual branch with prob ``p``.

    Survivors are scaled by 1/(1-p) so the expected output equals the input, which
    makes evaluation (where the branch is always kept) need no rescaling.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = check_rate("drop_path probability", p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask_shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = x.new_empty(mask_shape).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


_PROJECTION_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _last_projection_name(body: nn.Module) -> str | None:
    """Qualified name of the last Linear/Conv inside ``body`` (``""`` if body is one)."""
    found = None
    for name, module in body.named_modules():
        if isinstance(module, _PROJECTION_TYPES):
            found = name
    return found


class Residual(nn.Module):
    """``x + drop_path(body(x))``.

    ``out_proj`` is the last Linear/Conv in ``body``: the projection that writes into
    the residual stream, which GPT-style init scales down with depth. It is looked up
    by name rather than stored as an attribute, so it is not registered twice (that
    would duplicate its weights in ``state_dict``).
    """

    def __init__(self, body: nn.Module, drop_path: float = 0.0) -> None:
        super().__init__()
        self.body = body
        self.drop_path = DropPath(drop_path)
        self._out_proj_name = _last_projection_name(body)

    @property
    def out_proj(self) -> nn.Module | None:
        """The last Linear/Conv inside ``body``, or None if the body has none."""
        if self._out_proj_name is None:
            return None
        return self.body.get_submodule(self._out_proj_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.body(x))
