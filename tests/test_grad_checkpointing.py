"""Gradient checkpointing: same numbers as the plain model, fewer activations kept."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainkit.config.schema import TrainConfig
from trainkit.errors import ConfigError
from trainkit.nn.models import (
    CheckpointedSequential, block_segments, cnn, enable_grad_checkpointing, mlp, residual_mlp,
)  # fmt: skip

MODELS = {
    "mlp": lambda: mlp(784, (64, 32), norm="batch", dropout=0.3),
    "cnn": lambda: cnn(channels=(4, 8), norm="batch", dropout=0.2),
    "residual_mlp": lambda: residual_mlp(784, width=32, depth=3, norm="batch", dropout=0.2, drop_path=0.3),
}


def loss_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(123)  # the same dropout / DropPath draws for both models
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_loss_gradients_and_running_stats(name):
    torch.manual_seed(0)
    plain = MODELS[name]()
    checkpointed = enable_grad_checkpointing(copy.deepcopy(plain))
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))

    plain_loss, plain_grads = loss_and_grads(plain, x, y)
    ckpt_loss, ckpt_grads = loss_and_grads(checkpointed, x, y)

    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=1e-5, atol=1e-7)
    assert plain_grads.keys() == ckpt_grads.keys()
    for key in plain_grads:
        torch.testing.assert_close(ckpt_grads[key], plain_grads[key], rtol=1e-5, atol=1e-6, msg=key)
    # BatchNorm statistics were updated exactly once, by the forward pass, not again by the recomputation
    plain_state, ckpt_state = plain.state_dict(), checkpointed.state_dict()
    tracked = [key for key in plain_state if key.endswith("num_batches_tracked")]
    assert tracked and all(int(ckpt_state[key]) == 1 for key in tracked)
    for key in plain_state:
        torch.testing.assert_close(ckpt_state[key], plain_state[key], rtol=1e-5, atol=1e-7, msg=key)


def test_dropout_masks_are_replayed_in_the_recomputation():
    """Without preserve_rng_state the recomputed masks would differ and the gradients with them."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(20, 50), nn.Dropout(0.5), nn.Linear(50, 3))
    checkpointed = enable_grad_checkpointing(copy.deepcopy(plain))
    x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))
    _, plain_grads = loss_and_grads(plain, x, y)
    _, ckpt_grads = loss_and_grads(checkpointed, x, y)
    for key in plain_grads:
        torch.testing.assert_close(ckpt_grads[key], plain_grads[key], rtol=1e-5, atol=1e-7)


def test_state_dict_keys_unchanged_and_loadable_both_ways():
    plain = mlp(784, (32,), dropout=0.1)
    checkpointed = enable_grad_checkpointing(mlp(784, (32,), dropout=0.1))
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    checkpointed.load_state_dict(plain.state_dict())
    fresh = mlp(784, (32,), dropout=0.1)
    fresh.load_state_dict(checkpointed.state_dict())
    plain.eval(), checkpointed.eval()
    x = torch.randn(5, 784)
    torch.testing.assert_close(checkpointed(x), plain(x))


def test_keeps_the_same_modules_and_mode():
    plain = mlp(784, (32,)).eval()
    checkpointed = enable_grad_checkpointing(plain)
    assert isinstance(checkpointed, CheckpointedSequential) and not checkpointed.training
    assert all(a is b for a, b in zip(plain, checkpointed))
    assert enable_grad_checkpointing(checkpointed) is checkpointed


def test_blocks_start_at_weight_layers():
    kinds = [[type(layer).__name__ for layer in block] for block in block_segments(list(mlp(784, (8, 4), dropout=0.1)))]
    assert kinds == [
        ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Dropout"],
        ["Linear", "BatchNorm1d", "ReLU", "Dropout"],
        ["Linear"],
    ]


def test_rejects_models_that_are_not_sequential():
    with pytest.raises(ConfigError, match="nn.Sequential"):
        enable_grad_checkpointing(nn.Linear(2, 2))


def test_config_flag_builds_a_checkpointed_model():
    from trainkit.recipes.images import load_dataset
    from trainkit.recipes.components import build_model_from_config

    data = load_dataset("synthetic", None, val_size=100, seed=0, device=torch.device("cpu"))
    config = TrainConfig(dataset="synthetic", grad_checkpointing=True).resolved()
    assert isinstance(build_model_from_config(config, data), CheckpointedSequential)
    plain = build_model_from_config(TrainConfig(dataset="synthetic").resolved(), data)
    assert not isinstance(plain, CheckpointedSequential)
