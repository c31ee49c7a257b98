"""trainkit.doctor: each code fires on a planted case and stays quiet on a near miss; the probe
leaves no trace; `trainkit doctor` reports, writes doctor.json and exits 0/1/2 (docs/doctor.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from trainkit.cli import main
from trainkit.config import TrainConfig
from trainkit.doctor import CODES, examine
from trainkit.nn.init import init_weights
from trainkit.nn.models import mlp
from trainkit.tasks import build_task

DOCS = Path(__file__).resolve().parents[1] / "docs" / "doctor.md"


def features(rows: int = 64, scale: float = 1.0, shift: float = 0.0):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(rows, 20, generator=generator) * scale + shift, torch.randint(0, 3, (rows,), generator=generator)


def deep(activation: type[nn.Module], depth: int = 8, width: int = 64, std: float | None = None,
         bias: float | None = None) -> nn.Sequential:  # fmt: skip
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(20, width), activation()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), activation()]
    model = nn.Sequential(*layers, nn.Linear(width, 3))
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear) and std is not None:
                layer.weight.normal_(0, std)
            if isinstance(layer, nn.Linear) and bias is not None:
                layer.bias.fill_(bias)
    return model


def small(*middle: nn.Module, head: nn.Module | None = None, width: int = 32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, width), *middle, head if head is not None else nn.Linear(width, 3))


class Sequences(nn.Module):
    """Token ids -> an LSTM or attention -> an optional norm -> 3 classes."""

    def __init__(self, kind: str, norm: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.kind = kind
        self.body = nn.LSTM(16, 16, batch_first=True) if kind == "lstm" else nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = {"batch": nn.BatchNorm1d(16), "layer": nn.LayerNorm(16), None: nn.Identity()}[norm]
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):
        x = self.embed(tokens)
        x = self.body(x)[0] if self.kind == "lstm" else self.body(x, x, x, need_weights=False)[0]
        return self.head(self.norm(x[:, -1]))


def tokens(rows: int = 32):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 50, (rows, 12), generator=generator), torch.randint(0, 3, (rows,), generator=generator)


def scaled(model: nn.Sequential, layer: int, factor: float) -> nn.Sequential:
    with torch.no_grad():
        model[layer].weight.mul_(factor)
    return model


class NaNOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(20, 3)

    def forward(self, x):
        return self.linear(x) * float("nan")


CONFIG = {"device": "cpu"}
# code: (planted model, batch, settings), (near miss, batch, settings)
CASES = {
    "unnormalized_inputs": ((small(nn.ReLU()), features(scale=80, shift=100), {}),
                            (small(nn.ReLU()), features(), {})),
    "loss_at_init": ((scaled(small(nn.ReLU()), -1, 30), features(), {}), (small(nn.ReLU()), features(), {})),
    "vanishing_gradients": ((deep(nn.Sigmoid, depth=12), features(), {}),
                            (init_weights(deep(nn.Tanh, depth=12), "xavier"), features(), {})),
    "dead_units": ((deep(nn.ReLU, bias=-10.0), features(), {}), (init_weights(deep(nn.ReLU), "he"), features(), {})),
    "saturated_units": ((scaled(small(nn.Sigmoid()), 0, 100), features(), {}), (small(nn.Sigmoid()), features(), {})),
    "init_scale": ((deep(nn.ReLU, std=0.5), features(), {}), (init_weights(deep(nn.ReLU), "he"), features(), {})),
    "batchnorm_after_dropout": ((small(nn.ReLU(), nn.Dropout(0.3), nn.BatchNorm1d(32)), features(), {}),
                                (init_weights(mlp(in_features=20, num_classes=3, hidden=(32, 32), norm="batch",
                                                  dropout=0.3), "he"), features(), {})),  # fmt: skip
    "dropout_on_output": ((small(nn.ReLU(), head=nn.Sequential(nn.Linear(32, 3), nn.Dropout(0.2))), features(), {}),
                          (small(nn.ReLU(), nn.Dropout(0.2)), features(), {})),
    "batchnorm_small_batch": ((small(nn.BatchNorm1d(32), nn.ReLU()), features(rows=4), {"batch_size": 4}),
                              (small(nn.GroupNorm(4, 32), nn.ReLU()), features(rows=2), {"batch_size": 2})),
    "batchnorm_in_sequence_model": ((Sequences("lstm", "batch"), tokens(), {}), (Sequences("lstm", "layer"), tokens(), {})),
    "no_clipping_recurrent": ((Sequences("lstm"), tokens(), {"clip_norm": None}), (Sequences("lstm"), tokens(), {})),
    "no_warmup": ((Sequences("attention"), tokens(), {"schedule": "cosine", "lr": 3e-3}),
                  (Sequences("attention"), tokens(), {"schedule": "warmup_cosine", "lr": 3e-3})),
    "nonfinite": ((NaNOut(), features(), {}), (small(nn.ReLU()), features(), {})),
}  # fmt: skip


def codes_of(model: nn.Module, batch, settings: dict) -> set[str]:
    return examine(model, batch, build_task("classification"), TrainConfig(**{**CONFIG, **settings})).codes()


@pytest.mark.parametrize("code", sorted(CASES))
def test_each_code_fires_on_its_planted_case_and_not_on_a_near_miss(code):
    (planted, batch, settings), (near_miss, near_batch, near_settings) = CASES[code]
    assert code in codes_of(planted, batch, settings)
    assert codes_of(near_miss, near_batch, near_settings) == set()


def test_every_code_has_a_planted_case_and_a_section_in_the_docs():
    assert set(CASES) == set(CODES)
    text = DOCS.read_text()
    assert all(re.search(rf"^### `{code}`", text, re.M) for code in CODES)


def test_the_probe_leaves_the_model_its_gradients_buffers_and_the_rng_as_they_were():
    model = small(nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5))
    model.eval()  # a flag the probe must put back
    x, y = features()
    nn.functional.cross_entropy(model(x), y).backward()  # gradients the user is accumulating
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    examine(model, (x, y), build_task("classification"), TrainConfig(**CONFIG))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(rng, torch.get_rng_state()) and not model.training


def test_the_report_is_worst_first_and_plain_json():
    report = examine(NaNOut(), features(), build_task("classification"), TrainConfig(**CONFIG))
    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["findings"][0]["code"] == "nonfinite" and payload["findings"][0]["severity"] == "error"
    assert {"name", "passed", "figures"} <= set(payload["checks"][0])
    assert "ERROR   nonfinite" in report.format()


def test_trainkit_doctor_reports_writes_doctor_json_and_exits_like_a_linter(tmp_path, capsys):
    assert main(["doctor", "--dataset", "synthetic", "--batch-size", "4", "--out", str(tmp_path / "broken")]) == 1
    saved = json.loads((tmp_path / "broken" / "doctor.json").read_text())
    assert [f["code"] for f in saved["findings"]] == ["batchnorm_small_batch"]
    assert saved["findings"][0]["evidence"] == {"rows": 4, "batchnorm_layers": 2}
    assert sorted(p.name for p in (tmp_path / "broken").iterdir()) == ["doctor.json"]  # nothing else left behind
    assert main(["doctor", "--dataset", "synthetic", "--out", str(tmp_path / "healthy")]) == 0
    assert "nothing wrong found" in capsys.readouterr().out
    assert main(["doctor", "--dataset", "synthetic", "--batch-size", "0"]) == 2
