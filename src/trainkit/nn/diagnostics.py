"""Signal diagnostics at initialisation: does the signal survive the depth of the network?

A badly scaled init multiplies the activations (and, backwards, the gradients) by a constant
factor per layer, so a deep network starts with signals that explode or vanish geometrically
with depth, and ReLU units that never fire. ``signal_diagnostics`` measures this with one
forward and backward pass on a batch, before any training: per layer the mean and std of its
output, the norm of its weight gradient, and for ReLU layers the fraction of dead units.

No trace
    The pass runs in train mode (as training would see the model), then puts back each
    module's train/eval flag, every gradient, every buffer (BatchNorm running statistics)
    and the torch RNG (dropout). Parameters are only read, never stepped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainkit.nn.layers import activation_name
from trainkit.tracking.plots import pyplot


__all__ = ["Diagnostics", "LayerStats", "signal_diagnostics"]

LossFn = Callable[[Tensor, Tensor], Tensor]

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WEIGHT_KINDS = frozenset(cls.__name__ for cls in WEIGHT_LAYERS)
# Activations whose output is exactly zero on half their domain: only these can die.
RELU_LIKE = (nn.ReLU, nn.ReLU6)


@dataclass
class LayerStats:
    """What one watched layer did on the batch (``index`` is its position in forward order)."""

    index: int
    name: str  # qualified module name, as in ``model.named_modules()``
    kind: str  # module class, e.g. "Linear", "ReLU"
    activation_mean: float  # of this layer's output over the whole batch
    activation_std: float
    grad_norm: float | None  # L2 norm of the weight gradient; None for layers without weights
    dead_fraction: float | None  # ReLU-like layers: units zero for every sample; None otherwise

    @property
    def has_weights(self) -> bool:
        """A Linear/Conv layer (its output is a pre-activation); otherwise an activation module."""
        return self.kind in _WEIGHT_KINDS


@dataclass
class Diagnostics:
    """Per-layer statistics of one forward/backward pass, and the loss of that pass."""

    layers: list[LayerStats]
    loss: float

    def activation_layers(self) -> list[LayerStats]:
        """The activation modules' rows: the signal each hidden layer passes on."""
        return [layer for layer in self.layers if not layer.has_weights]

    def weight_layers(self) -> list[LayerStats]:
        """The Linear/Conv rows: the layers an optimizer would update."""
        return [layer for layer in self.layers if layer.has_weights]

    def to_rows(self) -> list[dict[str, Any]]:
        """One plain dict per layer, for CSV or JSON."""
        return [asdict(layer) for layer in self.layers]

    def table(self) -> str:
        """A markdown table, one line per layer in forward order."""
        lines = [
            "| # | layer | kind | mean | std | weight grad norm | dead fraction |",
            "|---|---|---|---|---|---|---|",
        ]
        for layer in self.layers:
            values = (layer.activation_mean, layer.activation_std, layer.grad_norm, layer.dead_fraction)
            lines.append(f"| {layer.index} | {layer.name} | {layer.kind} | " + " | ".join(map(_fmt, values)) + " |")
        lines.append(f"\nloss: {_fmt(self.loss)}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Activation std and weight-grad norm against depth on a log axis; returns the path.

        A straight rising or falling line is a signal exploding or vanishing geometrically.
        Non-finite and zero values cannot sit on a log axis and are left out.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        _plot_log_series(ax, self.layers, "activation_std", "output std (every layer)", "o")
        _plot_log_series(ax, self.weight_layers(), "grad_norm", "weight grad norm (Linear/Conv)", "s")
        ax.set_yscale("log")
        ax.set_xlabel("layer (forward order)")
        ax.set_ylabel("value at init")
        ax.set_title(f"signal at init; loss {_fmt(self.loss)}")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def signal_diagnostics(
    model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn = F.cross_entropy
) -> Diagnostics:
    """One forward+backward pass in train mode, recording every Linear/Conv and activation output.

    Linear/Conv outputs are the pre-activations; activation modules are those
    ``trainkit.nn.layers.activation_name`` knows. The model is left exactly as it was (see the
    module docstring); NaN/inf anywhere is reported as NaN/inf rather than raised.
    """
    watched = dict(_watched_modules(model))
    outputs: dict[str, Tensor] = {}  # filled in forward order
    with _leaving_no_trace(model), _recording_outputs(watched, outputs), torch.enable_grad():
        model.train()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        layers = [_layer_stats(i, name, watched[name], output) for i, (name, output) in enumerate(outputs.items())]
    return Diagnostics(layers=layers, loss=float(loss.detach()))


# ------------------------------------------------------------------------------- measuring


def _watched_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, WEIGHT_LAYERS) or activation_name(module) is not None:
            yield name, module


def _layer_stats(index: int, name: str, module: nn.Module, output: Tensor) -> LayerStats:
    values = output.detach().double()  # float64: a std of 1e30 must not overflow into inf
    return LayerStats(
        index=index,
        name=name,
        kind=type(module).__name__,
        activation_mean=float(values.mean()),
        activation_std=float(values.std(correction=0)),
        grad_norm=_weight_grad_norm(module),
        dead_fraction=dead_fraction(output) if isinstance(module, RELU_LIKE) else None,
    )


def _weight_grad_norm(module: nn.Module) -> float | None:
    weight = getattr(module, "weight", None) if isinstance(module, WEIGHT_LAYERS) else None
    if weight is None or weight.grad is None:
        return None
    return float(weight.grad.double().norm())


def dead_fraction(output: Tensor) -> float:
    """Share of units (features, or channel×position for conv maps) that are 0 for every sample."""
    per_unit = output.detach().reshape(output.shape[0], -1)
    return float((per_unit == 0).all(dim=0).double().mean())


# ------------------------------------------------------------------------------ no trace


@contextmanager
def _recording_outputs(watched: dict[str, nn.Module], outputs: dict[str, Tensor]) -> Iterator[None]:
    """Forward hooks that store each watched module's output; always removed again."""
    handles = [module.register_forward_hook(_store_output(outputs, name)) for name, module in watched.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _store_output(outputs: dict[str, Tensor], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: Tensor) -> None:
        outputs[name] = output.detach()

    return hook


@contextmanager
def _leaving_no_trace(model: nn.Module) -> Iterator[None]:
    """Put back train/eval flags, gradients, buffers and the torch RNG, even if the pass raises."""
    flags = [module.training for module in model.modules()]
    grads = [param.grad for param in model.parameters()]
    buffers = [buffer.detach().clone() for buffer in model.buffers()]
    for param in model.parameters():
        param.grad = None
    cuda_devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        for module, training in zip(model.modules(), flags):
            module.training = training
        for param, grad in zip(model.parameters(), grads):
            param.grad = grad
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)


# ------------------------------------------------------------------------------ formatting


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _plot_log_series(ax: Any, layers: list[LayerStats], field: str, label: str, marker: str) -> None:
    points = [(layer.index, getattr(layer, field)) for layer in layers]
    points = [(x, y) for x, y in points if y is not None and math.isfinite(y) and y > 0]
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker=marker, markersize=4, label=label)
