import math

import pytest
import torch
from torch import nn

from trainkit.errors import ConfigError
from trainkit.nn.init import INIT_SCHEMES, init_weights, resolve_auto_scheme
from trainkit.nn.layers import Residual
from trainkit.nn.models import cnn, mlp, residual_mlp

FAN_IN, FAN_OUT = 1000, 500


def big_linear(activation: nn.Module | None = None, out_features: int = FAN_OUT) -> nn.Module:
    """A Linear(1000 -> out_features) weight of shape (out, in), optionally followed by an activation."""
    layers = [nn.Linear(FAN_IN, out_features)]
    if activation is not None:
        layers.append(activation)
    return nn.Sequential(*layers)


def weight(model: nn.Module) -> torch.Tensor:
    return model[0].weight.detach()


def std(w: torch.Tensor) -> float:
    return w.std().item()


# -------------------------------------------------------------------- per scheme


def test_kaiming_normal_fan_in_std():
    torch.manual_seed(0)
    model = init_weights(big_linear(nn.ReLU()), "kaiming_normal")
    assert std(weight(model)) == pytest.approx(math.sqrt(2 / FAN_IN), rel=0.02)
    assert weight(model).mean().item() == pytest.approx(0.0, abs=1e-3)


def test_kaiming_normal_fan_out_std():
    torch.manual_seed(0)
    model = init_weights(big_linear(nn.ReLU()), "he", mode="fan_out")
    assert std(weight(model)) == pytest.approx(math.sqrt(2 / FAN_OUT), rel=0.02)


def test_kaiming_uniform_bound():
    torch.manual_seed(0)
    w = weight(init_weights(big_linear(nn.ReLU()), "he_uniform"))
    bound = math.sqrt(2) * math.sqrt(3 / FAN_IN)
    assert w.abs().max().item() <= bound
    assert std(w) == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_kaiming_uses_leaky_slope_of_model():
    torch.manual_seed(0)
    w = weight(init_weights(big_linear(nn.LeakyReLU(0.5)), "kaiming_normal"))
    gain = math.sqrt(2 / (1 + 0.5**2))
    assert std(w) == pytest.approx(gain / math.sqrt(FAN_IN), rel=0.02)


def test_kaiming_nonlinearity_override():
    torch.manual_seed(0)
    w = weight(init_weights(big_linear(nn.ReLU()), "kaiming_normal", nonlinearity="tanh"))
    assert std(w) == pytest.approx(5 / 3 / math.sqrt(FAN_IN), rel=0.02)


@pytest.mark.parametrize("name", ["xavier_uniform", "xavier", "glorot"])
def test_xavier_uniform_bound_and_std(name):
    torch.manual_seed(0)
    w = weight(init_weights(big_linear(), name))
    bound = math.sqrt(6 / (FAN_IN + FAN_OUT))
    assert w.abs().max().item() <= bound
    assert w.abs().max().item() > 0.99 * bound
    assert std(w) == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_xavier_gain_from_tanh():
    torch.manual_seed(0)
    w = weight(init_weights(big_linear(nn.Tanh()), "xavier_normal"))
    expected = 5 / 3 * math.sqrt(2 / (FAN_IN + FAN_OUT))
    assert std(w) == pytest.approx(expected, rel=0.02)


def test_xavier_unknown_activation_gain_is_one():
    torch.manual_seed(0)
    w = weight(init_weights(big_linear(nn.GELU()), "xavier_normal"))
    assert std(w) == pytest.approx(math.sqrt(2 / (FAN_IN + FAN_OUT)), rel=0.02)


@pytest.mark.parametrize("name", ["lecun_normal", "lecun"])
def test_lecun_normal_std(name):
    torch.manual_seed(0)
    w = weight(init_weights(big_linear(nn.SELU()), name))
    assert std(w) == pytest.approx(1 / math.sqrt(FAN_IN), rel=0.02)


def test_lecun_uniform_bound():
    torch.manual_seed(0)
    w = weight(init_weights(big_linear(nn.SELU()), "lecun_uniform"))
    bound = math.sqrt(3 / FAN_IN)
    assert w.abs().max().item() <= bound
    assert std(w) == pytest.approx(1 / math.sqrt(FAN_IN), rel=0.02)


def test_uniform_baseline_range():
    torch.manual_seed(0)
    w = weight(init_weights(big_linear(), "uniform"))
    assert w.min().item() >= -1.0 and w.max().item() <= 1.0
    assert w.min().item() < -0.99 and w.max().item() > 0.99
    assert std(w) == pytest.approx(1 / math.sqrt(3), rel=0.02)


def test_normal_baseline_std():
    torch.manual_seed(0)
    w = weight(init_weights(big_linear(), "normal"))
    assert std(w) == pytest.approx(1.0, rel=0.02)


def test_orthogonal_square_is_orthogonal():
    torch.manual_seed(0)
    w = weight(init_weights(big_linear(out_features=FAN_IN), "orthogonal"))
    torch.testing.assert_close(w @ w.T, torch.eye(FAN_IN), atol=1e-4, rtol=0)


def test_orthogonal_gain_from_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 200), nn.ReLU())
    w = model[0].weight.detach()
    init_weights(model, "orthogonal")
    torch.testing.assert_close(w @ w.T, 2 * torch.eye(200), atol=1e-4, rtol=0)


def test_gpt_scales_residual_output_projections():
    torch.manual_seed(0)
    depth = 4
    model = init_weights(residual_mlp(width=512, depth=depth), "gpt")
    blocks = [m for m in model if isinstance(m, Residual)]
    for block in blocks:
        assert std(block.out_proj.weight) == pytest.approx(0.02 / math.sqrt(2 * depth), rel=0.03)
        assert std(block.body[1].weight) == pytest.approx(0.02, rel=0.03)
    assert std(model[1].weight) == pytest.approx(0.02, rel=0.03)  # stem
    assert std(model[-1].weight) == pytest.approx(0.02, rel=0.05)  # head (512*10 values)


def test_gpt_without_residual_blocks_is_plain_normal():
    torch.manual_seed(0)
    w = weight(init_weights(big_linear(nn.GELU()), "gpt"))
    assert std(w) == pytest.approx(0.02, rel=0.02)


# ----------------------------------------------------------- biases, norms, convs


@pytest.mark.parametrize("scheme", ["kaiming_normal", "xavier_uniform", "gpt", "normal", "orthogonal"])
def test_biases_zero_and_norms_identity(scheme):
    model = residual_mlp(width=32, depth=2)
    model.append(nn.BatchNorm1d(10))
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
            nn.init.uniform_(module.weight, 2, 3)
            nn.init.uniform_(module.bias, 2, 3)
    init_weights(model, scheme)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert torch.all(module.bias == 0)
        if isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_conv_weights_initialised_and_groupnorm_reset():
    torch.manual_seed(0)
    model = cnn(channels=(64, 64), norm="group")
    for gn in (m for m in model if isinstance(m, nn.GroupNorm)):
        nn.init.constant_(gn.weight, 5.0)
    init_weights(model, "kaiming_normal")
    conv = model[4]
    assert isinstance(conv, nn.Conv2d)
    fan_in = 64 * 3 * 3
    assert std(conv.weight) == pytest.approx(math.sqrt(2 / fan_in), rel=0.03)
    assert all(torch.all(m.weight == 1) for m in model if isinstance(m, nn.GroupNorm))


def test_conv1d_is_initialised():
    model = nn.Sequential(nn.Conv1d(4, 4, 3))
    init_weights(model, "uniform")
    assert model[0].weight.abs().max().item() > 1 / math.sqrt(12)  # beyond PyTorch's default bound
    assert torch.all(model[0].bias == 0)


# ------------------------------------------------------------------- auto / misc


def test_resolve_auto_scheme_table():
    for act in ("relu", "leaky_relu", "gelu", "silu"):
        assert resolve_auto_scheme(act) == "kaiming_normal"
    for act in ("tanh", "sigmoid", "identity"):
        assert resolve_auto_scheme(act) == "xavier_uniform"
    assert resolve_auto_scheme("selu") == "lecun_normal"
    assert resolve_auto_scheme(None) == "xavier_uniform"
    with pytest.raises(ConfigError, match="relu"):
        resolve_auto_scheme("swish")


def first_weight(model: nn.Module) -> torch.Tensor:
    return next(m for m in model if isinstance(m, nn.Linear)).weight.detach()


def test_auto_uses_he_for_relu_mlp():
    torch.manual_seed(0)
    model = init_weights(mlp(), "auto")
    assert std(first_weight(model)) == pytest.approx(math.sqrt(2 / 784), rel=0.02)


def test_auto_uses_xavier_for_tanh_mlp():
    torch.manual_seed(0)
    w = first_weight(init_weights(mlp(activation="tanh"), "auto"))
    bound = 5 / 3 * math.sqrt(6 / (784 + 256))
    assert w.abs().max().item() <= bound
    assert std(w) == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_auto_uses_lecun_for_selu_mlp():
    torch.manual_seed(0)
    w = first_weight(init_weights(mlp(activation="selu", norm="none"), "auto"))
    assert std(w) == pytest.approx(1 / math.sqrt(784), rel=0.02)


def test_same_seed_gives_identical_weights():
    torch.manual_seed(123)
    a = init_weights(residual_mlp(width=32, depth=2), "kaiming_uniform")
    torch.manual_seed(123)
    b = init_weights(residual_mlp(width=32, depth=2), "kaiming_uniform")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_default_leaves_weights_unchanged():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert init_weights(model, "default") is model
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_init_returns_model_and_has_no_grad_history():
    model = mlp()
    assert init_weights(model, "he") is model
    assert all(p.grad_fn is None and p.requires_grad for p in model.parameters())


def test_all_listed_schemes_run():
    for scheme in INIT_SCHEMES:
        init_weights(residual_mlp(width=8, depth=2), scheme)


@pytest.mark.parametrize(
    "kwargs, listed",
    [
        ({"scheme": "magic"}, "kaiming_normal"),
        ({"scheme": "he", "mode": "fan_avg"}, "fan_in, fan_out"),
        ({"scheme": "he", "nonlinearity": "swish"}, "leaky_relu"),
    ],
)
def test_bad_options_raise_config_error(kwargs, listed):
    with pytest.raises(ConfigError, match=listed):
        init_weights(mlp(hidden=(8,)), **kwargs)


def test_lecun_always_uses_fan_in():
    torch.manual_seed(0)
    w = weight(init_weights(big_linear(nn.SELU()), "lecun_normal", mode="fan_out"))
    assert std(w) == pytest.approx(1 / math.sqrt(FAN_IN), rel=0.02)
