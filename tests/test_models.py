import pytest
import torch
from torch import nn

from trainkit.errors import ConfigError
from trainkit.nn.layers import Dropout, DropPath, Residual
from trainkit.nn.models import MODEL_NAMES, build_model, cnn, drop_path_rates, mlp, model_activation, residual_mlp


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def batch(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28)


# ----------------------------------------------------------------------------- mlp


def test_mlp_default_structure():
    model = mlp()
    kinds = [type(m) for m in model]
    assert kinds == [
        nn.Flatten,
        nn.Linear, nn.BatchNorm1d, nn.ReLU,
        nn.Linear, nn.BatchNorm1d, nn.ReLU,
        nn.Linear,
    ]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 256), (256, 128), (128, 10)]


def test_mlp_default_parameter_count():
    expected = (
        (784 * 256 + 256) + 2 * 256  # Linear + BN
        + (256 * 128 + 128) + 2 * 128
        + (128 * 10 + 10)
    )
    assert expected == 235_914
    assert n_params(mlp()) == expected


def test_mlp_dropout_and_norm_options():
    model = mlp(hidden=(32,), norm="layer", dropout=0.2, activation="tanh")
    kinds = [type(m) for m in model]
    assert kinds == [nn.Flatten, nn.Linear, nn.LayerNorm, nn.Tanh, Dropout, nn.Linear]
    assert model[4].p == 0.2
    assert not any(isinstance(m, nn.Dropout) for m in mlp())


def test_mlp_output_shape():
    assert mlp()(batch()).shape == (4, 10)
    assert mlp(hidden=())(batch()).shape == (4, 10)


# -------------------------------------------------------------------- residual_mlp


def test_residual_mlp_structure_and_shape():
    model = residual_mlp(width=64, depth=3)
    assert isinstance(model[0], nn.Flatten)
    assert isinstance(model[1], nn.Linear) and model[1].in_features == 784
    blocks = [m for m in model if isinstance(m, Residual)]
    assert len(blocks) == 3
    body = blocks[0].body
    assert [type(m) for m in body] == [nn.LayerNorm, nn.Linear, nn.ReLU, nn.Linear]
    assert blocks[0].out_proj is body[3]
    assert [type(m) for m in model[-3:]] == [nn.LayerNorm, nn.ReLU, nn.Linear]
    assert model(batch()).shape == (4, 10)


def test_residual_mlp_drop_path_rises_linearly():
    model = residual_mlp(width=16, depth=5, drop_path=0.2)
    rates = [m.drop_path.p for m in model if isinstance(m, Residual)]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert drop_path_rates(0.3, 1) == [0.0]


def test_residual_mlp_dropout_inside_blocks():
    model = residual_mlp(width=16, depth=2, dropout=0.1)
    block = next(m for m in model if isinstance(m, Residual))
    assert [type(m) for m in block.body] == [
        nn.LayerNorm, nn.Linear, nn.ReLU, Dropout, nn.Linear
    ]


def test_residual_mlp_trains_with_drop_path():
    model = residual_mlp(width=16, depth=2, drop_path=0.5).train()
    out = model(batch(8))
    out.sum().backward()
    assert out.shape == (8, 10)
    assert any(isinstance(m, DropPath) for m in model.modules())


# ----------------------------------------------------------------------------- cnn


def test_cnn_default_structure_and_shape():
    model = cnn()
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 32), (32, 64), (64, 128)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == 3
    head = model[-1]
    assert isinstance(head, nn.Linear) and head.in_features == 128 * 3 * 3
    assert model(batch()).shape == (4, 10)


def test_cnn_conv_bias_only_without_norm():
    assert all(c.bias is None for c in cnn() if isinstance(c, nn.Conv2d))
    assert all(c.bias is not None for c in cnn(norm="none") if isinstance(c, nn.Conv2d))


def test_cnn_norm_and_dropout_options():
    model = cnn(channels=(8, 16), norm="group", dropout=0.25, image_size=32, in_channels=3)
    groups = [m for m in model if isinstance(m, nn.GroupNorm)]
    assert [g.num_groups for g in groups] == [8, 8]
    assert [type(m) for m in model[-3:]] == [nn.Flatten, Dropout, nn.Linear]
    assert model[-1].in_features == 16 * 8 * 8
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cnn_layer_norm_is_groupnorm_one_group():
    model = cnn(channels=(8,), norm="layer")
    norm = model[1]
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 1


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "build",
    [
        lambda: mlp(norm="instance"),
        lambda: mlp(activation="swish"),
        lambda: mlp(dropout=1.0),
        lambda: mlp(dropout=-0.1),
        lambda: mlp(hidden=(0,)),
        lambda: mlp(num_classes=0),
        lambda: residual_mlp(depth=0),
        lambda: residual_mlp(drop_path=1.0),
        lambda: cnn(channels=()),
        lambda: cnn(image_size=4, channels=(4, 4, 4)),
        lambda: cnn(norm="weird"),
    ],
)
def test_bad_arguments_raise_config_error(build):
    with pytest.raises(ConfigError):
        build()


def test_bad_norm_message_lists_choices():
    with pytest.raises(ConfigError, match="batch, layer, group, none"):
        cnn(norm="weird")


# --------------------------------------------------------------------- build_model


def test_model_names():
    assert MODEL_NAMES == ("mlp", "residual_mlp", "cnn")


def test_build_model_maps_input_shape():
    model = build_model("mlp", (3, 8, 8), 5, hidden=(16,))
    assert model[1].in_features == 3 * 8 * 8 and model[-1].out_features == 5

    model = build_model("residual_mlp", (1, 28, 28), 10, width=32, depth=2, drop_path=0.1)
    assert model[1].in_features == 784
    assert model(batch()).shape == (4, 10)

    model = build_model("cnn", (3, 32, 32), 7, channels=(8, 16), norm="group")
    assert model[0].in_channels == 3
    assert model[-1].in_features == 16 * 8 * 8
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_build_model_defaults_match_builders():
    assert n_params(build_model("mlp", (1, 28, 28), 10)) == n_params(mlp())
    assert n_params(build_model("cnn", (1, 28, 28), 10)) == n_params(cnn())


def test_build_model_drops_none_options():
    model = build_model("mlp", (1, 28, 28), 10, dropout=None, hidden=None)
    assert n_params(model) == n_params(mlp())


def test_build_model_unknown_name_lists_names():
    with pytest.raises(ConfigError, match="mlp, residual_mlp, cnn"):
        build_model("resnet", (1, 28, 28), 10)


def test_build_model_rejects_options_the_model_does_not_take():
    with pytest.raises(ConfigError, match="drop_path"):
        build_model("mlp", (1, 28, 28), 10, drop_path=0.1)


def test_build_model_cnn_needs_square_chw():
    with pytest.raises(ConfigError):
        build_model("cnn", (28, 28), 10)
    with pytest.raises(ConfigError):
        build_model("cnn", (1, 28, 32), 10)


# ---------------------------------------------------------------- model_activation


def test_model_activation():
    assert model_activation(mlp()) == "relu"
    assert model_activation(mlp(activation="tanh", norm="none")) == "tanh"
    assert model_activation(mlp(activation="identity", norm="none")) == "identity"
    assert model_activation(residual_mlp(width=8, depth=1, activation="selu")) == "selu"
    assert model_activation(cnn(activation="leaky_relu")) == "leaky_relu"
    assert model_activation(nn.Linear(3, 3)) is None


def test_mlp_norm_after_dropout_reorders_each_block():
    from torch import nn as tnn

    default = [type(m) for m in mlp(hidden=(8,), dropout=0.5)]
    reordered = [type(m) for m in mlp(hidden=(8,), dropout=0.5, norm_after_dropout=True)]
    assert default == [tnn.Flatten, tnn.Linear, tnn.BatchNorm1d, tnn.ReLU, Dropout, tnn.Linear]
    assert reordered == [tnn.Flatten, tnn.Linear, tnn.ReLU, Dropout, tnn.BatchNorm1d, tnn.Linear]


def test_the_cnn_channels_setting_builds_those_stages_and_is_refused_for_other_models():
    from trainkit.recipes.components import build_architecture
    from trainkit.config.schema import TrainConfig
    from trainkit.recipes.images import load_dataset

    data = load_dataset("synthetic")
    model = build_architecture(TrainConfig(dataset="synthetic", model="cnn", channels=[8, 16]).resolved(), data)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16]
    with pytest.raises(ConfigError, match="--channels sets the cnn's conv stages; --model mlp has none"):
        TrainConfig(dataset="synthetic", model="mlp", channels=[8]).resolved()
    with pytest.raises(ConfigError, match="--channels must be a list of positive channel counts"):
        TrainConfig(dataset="synthetic", model="cnn", channels=[]).resolved()
