"""Signal diagnostics at init: hand-computed stats, dead ReLUs, exploding signals, no trace."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainkit.nn.diagnostics import signal_diagnostics
from trainkit.nn.init import init_weights
from trainkit.nn.layers import IdentityActivation
from trainkit.nn.models import mlp


def sum_of_outputs(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient w.r.t. the outputs is all ones, so weight gradients are closed-form."""
    return outputs.sum()


def doubling_stack(depth: int = 3) -> nn.Sequential:
    """Bias-free Linear(4, 4) layers with weight 2·I, each followed by an identity activation."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            linear.weight.copy_(2 * torch.eye(4))
        layers += [linear, IdentityActivation()]
    return nn.Sequential(*layers)


X = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])  # mean 4.5, population std sqrt(5.25)
NO_TARGETS = torch.zeros(2)


def test_a_linear_stack_doubles_the_signal_per_layer_as_computed_by_hand():
    diagnostics = signal_diagnostics(doubling_stack(), X, NO_TARGETS, loss_fn=sum_of_outputs)

    assert [layer.kind for layer in diagnostics.layers] == ["Linear", "IdentityActivation"] * 3
    assert [layer.name for layer in diagnostics.layers] == ["0", "1", "2", "3", "4", "5"]
    for layer in diagnostics.layers:
        scale = 2 ** (layer.index // 2 + 1)  # both the Linear and its activation output 2^k · X
        assert layer.activation_mean == pytest.approx(4.5 * scale)
        assert layer.activation_std == pytest.approx(math.sqrt(5.25) * scale)
        assert layer.dead_fraction is None
    # out = 8·X, so the loss is 8 · sum(X) = 8 · 36
    assert diagnostics.loss == pytest.approx(288.0)
    # layer k (1..3): dL/dW_k = (2^(3-k) · 1)^T (2^(k-1) · X) = 4 · 1^T X, every row 4 · column sums
    # (6, 8, 10, 12) of X, so ||dL/dW_k|| = 4 · sqrt(4 · (36 + 64 + 100 + 144)) for every layer
    expected_grad_norm = 4 * math.sqrt(4 * 344)
    assert [layer.grad_norm for layer in diagnostics.weight_layers()] == pytest.approx([expected_grad_norm] * 3)
    assert all(layer.grad_norm is None for layer in diagnostics.activation_layers())


def test_dead_fraction_counts_units_that_are_zero_for_every_sample():
    linear = nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        # unit 0 copies x0 (negative for one sample only: not dead), unit 1 copies x1,
        # unit 2 is -x2 (negative for both samples: dead), unit 3 is always 0 (dead)
        linear.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, -1], [0, 0, 0]]))
    model = nn.Sequential(linear, nn.ReLU())
    inputs = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 1.0, 2.0]])

    relu = signal_diagnostics(model, inputs, NO_TARGETS, loss_fn=sum_of_outputs).layers[1]

    assert relu.kind == "ReLU"
    assert relu.dead_fraction == 0.5
    assert relu.activation_mean == pytest.approx(4 / 8)  # outputs (1, 2, 0, 0) and (0, 1, 0, 0)
    assert relu.grad_norm is None


def deep_mlp(activation: str, scheme: str) -> nn.Module:
    torch.manual_seed(0)
    model = mlp(64, hidden=[64] * 10, num_classes=10, norm="none", activation=activation)
    return init_weights(model, scheme)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(256, 64, generator=generator), torch.randint(0, 10, (256,), generator=generator)


def growth(stds: list[float]) -> float:
    return stds[-1] / stds[0]


def test_uniform_init_explodes_a_deep_relu_mlp_while_he_keeps_it_order_one(batch):
    uniform = signal_diagnostics(deep_mlp("relu", "uniform"), *batch).activation_layers()
    he = signal_diagnostics(deep_mlp("relu", "kaiming_normal"), *batch).activation_layers()

    # U[-1, 1] has variance 1/3, so each ReLU layer of width 64 scales the std by ~sqrt(64/6) ≈ 3.3
    assert growth([layer.activation_std for layer in uniform]) > 1e3
    assert 0.2 < growth([layer.activation_std for layer in he]) < 5
    assert all(0.1 < layer.activation_std < 10 for layer in he)


def test_uniform_init_saturates_a_deep_tanh_mlp_and_explodes_its_gradients_towards_the_input(batch):
    uniform = signal_diagnostics(deep_mlp("tanh", "uniform"), *batch)
    xavier = signal_diagnostics(deep_mlp("tanh", "xavier_uniform"), *batch)

    assert all(layer.activation_std > 0.85 for layer in uniform.activation_layers()), "tanh outputs are ±1"
    first_over_last = lambda d: d.weight_layers()[0].grad_norm / d.weight_layers()[-1].grad_norm  # noqa: E731
    assert first_over_last(uniform) > 30
    assert first_over_last(xavier) < 5


def test_diagnostics_leave_no_trace_on_the_model_or_the_rng(batch):
    torch.manual_seed(0)
    model = mlp(64, hidden=[32, 32], num_classes=10, norm="batch", dropout=0.5)  # buffers and dropout
    model.eval()
    model[2].train()  # a mixed train/eval state must come back as it was
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    flags = [module.training for module in model.modules()]
    rng = torch.get_rng_state()

    signal_diagnostics(model, *batch)

    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before), "parameters and buffers unchanged"
    assert [module.training for module in model.modules()] == flags
    assert all(param.grad is None for param in model.parameters())
    assert all(not module._forward_hooks for module in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_non_finite_signals_are_reported_not_raised(batch):
    model = deep_mlp("relu", "kaiming_normal")
    with torch.no_grad():
        model[1].weight.fill_(math.inf)

    diagnostics = signal_diagnostics(model, *batch)

    assert math.isnan(diagnostics.loss)
    assert not math.isfinite(diagnostics.layers[0].activation_std)


def test_table_rows_and_plot(batch, tmp_path):
    diagnostics = signal_diagnostics(deep_mlp("relu", "uniform"), *batch)

    table = diagnostics.table().splitlines()
    assert table[0].startswith("| # | layer | kind |")
    assert sum(line.startswith("| ") for line in table) == 1 + len(diagnostics.layers)
    rows = diagnostics.to_rows()
    assert rows[1]["kind"] == "ReLU" and set(rows[1]) >= {"activation_std", "grad_norm", "dead_fraction"}

    path = diagnostics.plot(tmp_path / "plots" / "signal.png")
    assert path.read_bytes().startswith(b"\x89PNG")
