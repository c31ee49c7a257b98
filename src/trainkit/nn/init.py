"""Weight initialisation schemes, all built on ``torch.nn.init``.

Initialisation sets the scale of activations and gradients at step 0; the right
scale depends on the nonlinearity (He for ReLU-like, Glorot for tanh/sigmoid, LeCun
for SELU). ``init_weights(model, "auto")`` reads the model's activation and picks
accordingly; the naive ``uniform``/``normal`` schemes exist as failing baselines.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from trainkit.nn.layers import ACTIVATIONS, Residual, check_choice
from trainkit.nn.models import model_activation

__all__ = [
    "INIT_MODES",
    "INIT_NONLINEARITIES",
    "INIT_SCHEMES",
    "SCHEME_ALIASES",
    "canonical_scheme",
    "init_weights",
    "resolve_auto_scheme",
]

_CANONICAL_SCHEMES: tuple[str, ...] = (
    "auto",
    "default",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "lecun_normal",
    "lecun_uniform",
    "orthogonal",
    "gpt",
    "gpt_unscaled",
    "uniform",
    "normal",
)

SCHEME_ALIASES: dict[str, str] = {
    "xavier": "xavier_uniform",
    "glorot": "xavier_uniform",
    "he": "kaiming_normal",
    "he_uniform": "kaiming_uniform",
    "he_normal": "kaiming_normal",
    "lecun": "lecun_normal",
}

INIT_SCHEMES: tuple[str, ...] = _CANONICAL_SCHEMES + tuple(SCHEME_ALIASES)
INIT_MODES: tuple[str, ...] = ("fan_in", "fan_out")
# Names nn.init.calculate_gain understands (minus the conv* aliases of "linear").
INIT_NONLINEARITIES: tuple[str, ...] = ("linear", "relu", "leaky_relu", "tanh", "sigmoid", "selu")

GPT_STD = 0.02
DEFAULT_LEAKY_SLOPE = 0.01

# The usual table: He for ReLU-like, Glorot for saturating/linear, LeCun for SELU.
_AUTO_SCHEME_BY_ACTIVATION: dict[str, str] = {
    "relu": "kaiming_normal",
    "leaky_relu": "kaiming_normal",
    "gelu": "kaiming_normal",
    "silu": "kaiming_normal",
    "tanh": "xavier_uniform",
    "sigmoid": "xavier_uniform",
    "identity": "xavier_uniform",
    "selu": "lecun_normal",
}

# calculate_gain has no entry for GELU/SiLU; they get the linear gain 1.
_GAIN_NONLINEARITY_BY_ACTIVATION: dict[str, str] = {
    "relu": "relu",
    "leaky_relu": "leaky_relu",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "selu": "selu",
}

_WEIGHTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
GPT_SCHEMES = ("gpt", "gpt_unscaled")  # N(0, 0.02) everywhere, embeddings included

WeightInit = Callable[[torch.Tensor], object]


# ------------------------------------------------------------------------ choosing


def canonical_scheme(scheme: str) -> str:
    """Resolve aliases (``he``, ``glorot``, ...) to the canonical scheme name."""
    check_choice("init scheme", scheme, INIT_SCHEMES)
    return SCHEME_ALIASES.get(scheme, scheme)


def resolve_auto_scheme(activation: str | None) -> str:
    """The scheme ``auto`` uses for a model whose activation is ``activation``.

    None (a model without activations) is linear, so it gets Glorot like ``identity``.
    """
    if activation is None:
        return "xavier_uniform"
    check_choice("activation", activation, ACTIVATIONS)
    return _AUTO_SCHEME_BY_ACTIVATION[activation]


def _leaky_slope(model: nn.Module) -> float:
    """Negative slope of the model's first LeakyReLU (PyTorch's 0.01 if it has none)."""
    for module in model.modules():
        if isinstance(module, nn.LeakyReLU):
            return float(module.negative_slope)
    return DEFAULT_LEAKY_SLOPE


def _gain_nonlinearity(activation: str | None, nonlinearity: str | None) -> str:
    if nonlinearity is not None:
        return nonlinearity
    return _GAIN_NONLINEARITY_BY_ACTIVATION.get(activation or "", "linear")


def _kaiming_nonlinearity(activation: str | None, nonlinearity: str | None) -> str:
    if nonlinearity is not None:
        return nonlinearity
    return "leaky_relu" if activation == "leaky_relu" else "relu"


def _weight_initialiser(
    scheme: str, model: nn.Module, mode: str, nonlinearity: str | None
) -> WeightInit:
    """A function that initialises one weight tensor in place according to ``scheme``."""
    activation = model_activation(model)
    slope = _leaky_slope(model)

    if scheme in ("kaiming_normal", "kaiming_uniform"):
        kaiming_nl = _kaiming_nonlinearity(activation, nonlinearity)
        a = slope if kaiming_nl == "leaky_relu" else 0.0
        init = nn.init.kaiming_normal_ if scheme == "kaiming_normal" else nn.init.kaiming_uniform_
        return lambda w: init(w, a=a, mode=mode, nonlinearity=kaiming_nl)

    if scheme in ("lecun_normal", "lecun_uniform"):
        # LeCun = Kaiming with gain 1: Var(w) = 1 / fan_in.
        init = nn.init.kaiming_normal_ if scheme == "lecun_normal" else nn.init.kaiming_uniform_
        return lambda w: init(w, mode="fan_in", nonlinearity="linear")

    gain = nn.init.calculate_gain(_gain_nonlinearity(activation, nonlinearity), slope)
    if scheme == "xavier_uniform":
        return lambda w: nn.init.xavier_uniform_(w, gain=gain)
    if scheme == "xavier_normal":
        return lambda w: nn.init.xavier_normal_(w, gain=gain)
    if scheme == "orthogonal":
        return lambda w: nn.init.orthogonal_(w, gain=gain)
    if scheme in GPT_SCHEMES:
        return lambda w: nn.init.normal_(w, mean=0.0, std=GPT_STD)
    if scheme == "uniform":
        return lambda w: nn.init.uniform_(w, -1.0, 1.0)
    if scheme == "normal":
        return lambda w: nn.init.normal_(w, mean=0.0, std=1.0)
    raise AssertionError(f"unhandled init scheme {scheme!r}")  # pragma: no cover


# ------------------------------------------------------------------------ applying


def _reset_norm(module: nn.Module) -> None:
    """Norm layers start as the identity transform: scale 1, shift 0."""
    if getattr(module, "weight", None) is not None:
        nn.init.ones_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def _scale_residual_projections(model: nn.Module) -> None:
    """GPT-2: residual output projections get std 0.02/sqrt(2·n_blocks).

    Each block adds to the residual stream, so without this its variance grows with depth.
    A model that names its projections (``residual_projections()``, the Transformer: two per
    block) gets 0.02/sqrt(their number), which is GPT-2's 0.02/sqrt(2·n_layer).
    """
    named = getattr(model, "residual_projections", None)
    if callable(named):
        projections = named()
        for projection in projections:
            nn.init.normal_(projection.weight, mean=0.0, std=GPT_STD / math.sqrt(len(projections)))
        return
    blocks = [m for m in model.modules() if isinstance(m, Residual)]
    if not blocks:
        return
    std = GPT_STD / math.sqrt(2 * len(blocks))
    for block in blocks:
        if block.out_proj is not None:
            nn.init.normal_(block.out_proj.weight, mean=0.0, std=std)


def init_weights(
    model: nn.Module,
    scheme: str = "auto",
    *,
    mode: str = "fan_in",
    nonlinearity: str | None = None,
) -> nn.Module:
    """Initialise ``model`` in place with ``scheme`` and return it.

    Every Linear/Conv1d/Conv2d weight gets the scheme, their biases are zeroed, and
    BatchNorm/LayerNorm/GroupNorm/RMSNorm get weight 1, bias 0. The GPT schemes also draw
    embeddings from N(0, 0.02); ``gpt_unscaled`` skips the residual scaling (an experiment's
    control). A head tied to an embedding shares its tensor: whichever is visited last wins.
    ``default`` leaves PyTorch's own init untouched. ``mode`` applies to the kaiming schemes;
    ``nonlinearity`` overrides the one read from the model (for kaiming and for the gain of
    xavier/orthogonal).
    """
    scheme = canonical_scheme(scheme)
    check_choice("init mode", mode, INIT_MODES)
    if nonlinearity is not None:
        check_choice("init nonlinearity", nonlinearity, INIT_NONLINEARITIES)
    if scheme == "default":
        return model
    if scheme == "auto":
        scheme = resolve_auto_scheme(model_activation(model))

    init_weight = _weight_initialiser(scheme, model, mode, nonlinearity)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _WEIGHTED_LAYERS):
                init_weight(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, _NORM_LAYERS):
                _reset_norm(module)
            elif isinstance(module, nn.Embedding) and scheme in GPT_SCHEMES:
                nn.init.normal_(module.weight, mean=0.0, std=GPT_STD)
        if scheme == "gpt":
            _scale_residual_projections(model)
    return model
