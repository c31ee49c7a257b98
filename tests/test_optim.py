"""Weight decay applies to weights only: never to biases or normalisation parameters."""

from __future__ import annotations

import pytest
import torch

from trainkit.errors import ConfigError
from trainkit.nn.models import cnn, mlp
from trainkit.optim.optimizers import build_optimizer, split_decay_parameters


def names(model, params):
    ids = {id(p) for p in params}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


@pytest.mark.parametrize("norm", ["batch", "layer", "group"])
def test_only_linear_weights_decay_in_the_mlp(norm):
    model = mlp(norm=norm)
    decay, no_decay = split_decay_parameters(model)
    linear_weights = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert names(model, decay) == [f"{n}.weight" for n in linear_weights]
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_cnn_norm_and_bias_parameters_do_not_decay():
    model = cnn()
    _, no_decay = split_decay_parameters(model)
    assert all(n.endswith("bias") or "weight" in n and model.get_parameter(n).ndim == 1 for n in names(model, no_decay))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_decay_shrinks_weights_but_leaves_biases_and_norm_parameters(name):
    model = mlp(norm="batch")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(name, model, lr=0.1, weight_decay=0.2, momentum=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only weight decay can move anything
    optimizer.step()
    for n, p in model.named_parameters():
        if n.endswith("weight") and p.ndim == 2:
            assert torch.allclose(p, before[n] * (1 - 0.1 * 0.2)), n
        else:
            assert torch.equal(p, before[n]), f"{n} must not decay"


def test_unknown_optimizer():
    with pytest.raises(ConfigError, match="adamw or sgd"):
        build_optimizer("lion", mlp(), lr=1e-3, weight_decay=0.0)
