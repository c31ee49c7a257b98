import pytest
import torch
from torch import nn

from trainkit.errors import ConfigError
from trainkit.nn.layers import (
    ACTIVATIONS, NORMS, Dropout, DropPath, IdentityActivation, Residual, activation_layer, activation_name, group_count, keep_mask, norm_layer,
)  # fmt: skip


# ---------------------------------------------------------------------- activations


@pytest.mark.parametrize(
    "name, cls",
    [
        ("relu", nn.ReLU),
        ("leaky_relu", nn.LeakyReLU),
        ("gelu", nn.GELU),
        ("silu", nn.SiLU),
        ("tanh", nn.Tanh),
        ("sigmoid", nn.Sigmoid),
        ("selu", nn.SELU),
        ("identity", nn.Identity),
    ],
)
def test_activation_layer_builds_the_named_module(name, cls):
    layer = activation_layer(name)
    assert isinstance(layer, cls)
    assert activation_name(layer) == name


def test_activations_lists_all_names():
    assert set(ACTIVATIONS) == {
        "relu", "leaky_relu", "gelu", "silu", "tanh", "sigmoid", "selu", "identity"
    }


def test_leaky_relu_slope_is_0_01():
    layer = activation_layer("leaky_relu")
    assert layer.negative_slope == 0.01
    assert layer(torch.tensor([-2.0])).item() == pytest.approx(-0.02)


def test_identity_activation_is_distinct_from_plain_identity():
    assert isinstance(activation_layer("identity"), IdentityActivation)
    assert activation_name(nn.Identity()) is None  # e.g. norm "none"


def test_unknown_activation_lists_choices():
    with pytest.raises(ConfigError, match="relu.*selu"):
        activation_layer("swish")


# ---------------------------------------------------------------------------- norms


def test_norm_layer_mlp_classes():
    assert isinstance(norm_layer("batch", 16, spatial=False), nn.BatchNorm1d)
    layer = norm_layer("layer", 16, spatial=False)
    assert isinstance(layer, nn.LayerNorm) and layer.normalized_shape == (16,)
    group = norm_layer("group", 16, spatial=False)
    assert isinstance(group, nn.GroupNorm) and group.num_groups == 8 and group.num_channels == 16
    assert type(norm_layer("none", 16, spatial=False)) is nn.Identity


def test_norm_layer_cnn_classes():
    assert isinstance(norm_layer("batch", 32, spatial=True), nn.BatchNorm2d)
    layer = norm_layer("layer", 32, spatial=True)
    assert isinstance(layer, nn.GroupNorm) and layer.num_groups == 1
    group = norm_layer("group", 32, spatial=True)
    assert isinstance(group, nn.GroupNorm) and group.num_groups == 8
    assert type(norm_layer("none", 32, spatial=True)) is nn.Identity


def test_spatial_layer_norm_normalises_each_sample_over_chw():
    x = torch.randn(4, 6, 5, 5) * 3 + 7
    y = norm_layer("layer", 6, spatial=True)(x)
    flat = y.flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(1, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)


@pytest.mark.parametrize("channels, groups", [(256, 8), (64, 8), (12, 4), (6, 2), (7, 1), (1, 1)])
def test_group_count(channels, groups):
    assert group_count(channels) == groups


def test_norms_constant():
    assert NORMS == ("batch", "layer", "group", "none")


def test_unknown_norm_lists_choices():
    with pytest.raises(ConfigError, match="batch, layer, group, none"):
        norm_layer("instance", 8, spatial=True)


# ------------------------------------------------------------------------- DropPath


def test_drop_path_eval_returns_input_unchanged():
    dp = DropPath(0.5).eval()
    x = torch.randn(64, 8)
    out = dp(x)
    assert out is x
    assert torch.equal(out, x)


def test_drop_path_zero_is_identity_in_training():
    dp = DropPath(0.0).train()
    x = torch.randn(64, 3, 4, 4)
    assert torch.equal(dp(x), x)


def test_drop_path_drops_whole_samples_and_rescales_survivors():
    torch.manual_seed(0)
    p = 0.5
    dp = DropPath(p).train()
    x = torch.randn(20000, 3, 2, 2)
    out = dp(x)

    dropped = (out == 0).flatten(1).all(1)
    kept = (out == x / (1 - p)).flatten(1).all(1)
    assert torch.all(dropped ^ kept)  # each sample exactly one of the two
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.02)


def test_drop_path_non_half_rate_scales_by_one_over_keep():
    torch.manual_seed(1)
    dp = DropPath(0.25).train()
    x = torch.randn(4000, 5)
    out = dp(x)
    kept = (out != 0).all(1)
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    assert torch.all(out[~kept] == 0)
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.03)


def test_drop_path_preserves_mean_in_expectation():
    torch.manual_seed(2)
    dp = DropPath(0.3).train()
    x = torch.ones(20000, 4)
    assert dp(x).mean().item() == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_drop_path_rejects_bad_rates(p):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        DropPath(p)


def test_drop_path_repr_shows_p():
    assert "p=0.2" in repr(DropPath(0.2))


# ------------------------------------------------------------------------- Residual


def test_residual_out_proj_is_last_linear():
    body = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    block = Residual(body)
    assert block.out_proj is body[3]


def test_residual_out_proj_not_registered_twice():
    block = Residual(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    keys = list(block.state_dict())
    assert keys == ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"]


def test_residual_out_proj_of_conv_body_and_of_bare_layer():
    conv_body = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 1))
    assert Residual(conv_body).out_proj is conv_body[2]
    bare = nn.Linear(4, 4)
    assert Residual(bare).out_proj is bare
    assert Residual(nn.ReLU()).out_proj is None


def test_residual_forward_adds_body_output():
    body = nn.Linear(4, 4)
    block = Residual(body, drop_path=0.5).eval()
    x = torch.randn(3, 4)
    torch.testing.assert_close(block(x), x + body(x))
    assert block.drop_path.p == 0.5


def test_dropout_keeps_1_minus_p_scales_by_its_inverse_and_passes_the_mask_to_the_gradient():
    torch.manual_seed(0)
    layer = Dropout(0.3).train()
    inputs = torch.ones(401, 499, requires_grad=True)  # not a multiple of the 4 masks per draw
    out = layer(inputs)
    kept = out != 0
    keep_probability = 1 - round(0.3 * 65536) / 65536  # p rounded to 16 bits
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.005)
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / keep_probability))
    out.sum().backward()
    torch.testing.assert_close(inputs.grad, kept.float() / keep_probability)


def test_each_of_the_four_masks_cut_from_one_64_bit_draw_keeps_1_minus_p():
    torch.manual_seed(1)
    keep, probability = keep_mask(torch.Size([4 * 50_000]), 0.5, torch.device("cpu"))
    assert probability == 0.5
    by_position = keep.view(-1, 4).float().mean(dim=0)  # position 3 holds the draw's sign bit
    torch.testing.assert_close(by_position, torch.full((4,), 0.5), atol=0.01, rtol=0)
    assert keep_mask(torch.Size([3, 5]), 1 - 1e-9, torch.device("cpu"))[1] == 1 / 65536  # never 0


def test_dropout_is_identity_in_eval_keeps_bf16_and_is_an_nn_dropout():
    layer = Dropout(0.5)
    assert isinstance(layer, torch.nn.Dropout)
    inputs = torch.randn(64, 32, dtype=torch.bfloat16)
    assert layer.train()(inputs).dtype == torch.bfloat16
    assert torch.equal(layer.eval()(inputs), inputs)
    assert torch.equal(Dropout(0.0).train()(inputs), inputs)
