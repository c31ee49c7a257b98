"""--batch-size auto: the memory measurement, its extrapolation and the choice."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from trainkit.loop import memory
from trainkit.cli import build_parser, train_config_from_args
from trainkit.config.schema import TrainConfig
from trainkit.errors import ConfigError, TrainkitError
from trainkit.loop.memory import (
    MAX_AUTO_BATCH, MemoryEstimate, MiB, StepMemory, activation_bytes_per_sample, check_model_fits, estimate_training_memory, find_batch_size, find_batch_size_by_trial, largest_fitting_power_of_two, measure_step_memory, predicted_peak,
)  # fmt: skip
from trainkit.nn.models import enable_grad_checkpointing, mlp


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def fake_step_memory(per_sample: int, fixed: int, optimizer: int):
    """A memory model: one event holding the fixed part, one adding per_sample bytes per sample."""

    def measure(model, optimizer_, inputs, targets, **_) -> StepMemory:
        return StepMemory(forward_backward=(fixed, fixed + per_sample * len(inputs)), optimizer=optimizer)

    return measure


# --------------------------------------------------------------- choosing


def test_chooses_the_largest_power_of_two_within_the_budget(monkeypatch):
    monkeypatch.setattr(memory, "measure_step_memory", fake_step_memory(MiB, 10 * MiB, 20 * MiB))
    x, y = data(1000)
    choice = find_batch_size(mlp(784, (8,)), TrainConfig(memory_budget=300 / 1024), x, y)
    assert choice.batch_size == 256  # 10 + 256 = 266 MiB fits 300; 512 would need 522
    assert "0.29 GiB memory budget" in choice.reason and "512 would need 0.51 GiB" in choice.reason


def test_capped_by_the_training_set_and_the_maximum(monkeypatch):
    monkeypatch.setattr(memory, "measure_step_memory", fake_step_memory(1, 0, 0))
    x, y = data(700)
    assert find_batch_size(mlp(784, (8,)), TrainConfig(memory_budget=8.0), x, y).batch_size == 512
    x, y = data(5000)
    choice = find_batch_size(mlp(784, (8,)), TrainConfig(memory_budget=8.0), x, y)
    assert choice.batch_size == MAX_AUTO_BATCH == 4096 and "cap" in choice.reason


def test_optimizer_peak_alone_over_budget_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(memory, "measure_step_memory", fake_step_memory(MiB, 0, 2048 * MiB))
    x, y = data(100)
    with pytest.raises(TrainkitError, match="even a batch of 1 exceeds the --memory-budget of 1.00 GiB"):
        find_batch_size(mlp(784, (8,)), TrainConfig(memory_budget=1.0), x, y)


def test_prediction_follows_a_peak_that_moves_with_the_batch():
    """Gradients (50 MiB) dominate small batches, activations (1 MiB/sample) large ones."""

    def measured(batch: int) -> StepMemory:
        return StepMemory(forward_backward=(batch * MiB, 50 * MiB + 2 * MiB), optimizer=60 * MiB)

    small, large = measured(16), measured(32)
    assert small.peak == large.peak == 60 * MiB  # extrapolating the peaks alone would predict 60 MiB forever
    assert predicted_peak(small, 16, large, 32, 1024) == 1024 * MiB
    assert predicted_peak(small, 16, large, 32, 64) == 64 * MiB
    assert predicted_peak(small, 16, large, 32, 48) == 60 * MiB


def test_largest_fitting_power_of_two():
    assert largest_fitting_power_of_two(lambda b: b <= 100, cap=4096) == 64
    assert largest_fitting_power_of_two(lambda b: True, cap=256) == 256
    assert largest_fitting_power_of_two(lambda b: False, cap=256) == 0
    assert largest_fitting_power_of_two(lambda b: b <= 100, cap=4096, start=2) == 64


# ------------------------------------------------------------- real runs


class OutOfMemoryAbove(nn.Module):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("simulated")
        return self.net(x)


class HostMemory:
    """The CUDA search's memory readings, measured on the CPU: ``free`` bytes as given, a step's peak
    above its start from the allocator events (trainkit.loop.memory.live_bytes)."""

    def __init__(self, free: int) -> None:
        self.free_bytes = free

    def free(self) -> int:
        return self.free_bytes

    def step_peak(self, step) -> int:
        return max(memory.live_bytes(step), default=0)

    def release(self) -> None:
        pass


def test_trial_search_backs_off_at_the_first_oom_and_leaves_no_trace():
    model = OutOfMemoryAbove(limit=100)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    rng = torch.get_rng_state()
    x, y = data(1000)
    choice = find_batch_size_by_trial(model, lambda: torch.optim.AdamW(model.parameters()), x, y, cap=512,
                                      memory=HostMemory(free=2**40))  # fmt: skip
    assert choice.batch_size == 64 and "128 did not fit" in choice.reason
    for key, value in model.state_dict().items():  # weights and BatchNorm statistics as before
        assert torch.equal(value, before[key]), key
    assert torch.equal(torch.get_rng_state(), rng)


def test_real_cpu_measurement_picks_a_power_of_two_that_fits():
    model = mlp(784, (256, 256), dropout=0.2)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    x, y = data(4096)
    budget = 24 * MiB
    choice = find_batch_size(model, TrainConfig(memory_budget=budget / 1024**3), x, y)
    size = choice.batch_size
    assert size & (size - 1) == 0 and 64 <= size < 4096, choice
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key

    def real_peak(batch: int) -> int:
        return measure_step_memory(model, torch.optim.AdamW(model.parameters()), x[:batch], y[:batch]).peak

    assert real_peak(size) <= budget < real_peak(2 * size)


def test_checkpointing_lowers_the_measured_activation_memory():
    x, y = data(512)
    plain = mlp(784, (512,) * 4)
    checkpointed = enable_grad_checkpointing(mlp(784, (512,) * 4))
    plain_peak = measure_step_memory(plain, torch.optim.SGD(plain.parameters(), lr=0.1), x, y).forward_backward_peak
    ckpt_peak = measure_step_memory(
        checkpointed, torch.optim.SGD(checkpointed.parameters(), lr=0.1), x, y
    ).forward_backward_peak
    assert ckpt_peak < 0.85 * plain_peak


def test_train_run_saves_the_resolved_batch_size(synthetic_config, caplog):
    from trainkit.recipes.run import train_run

    config = synthetic_config(batch_size="auto", memory_budget=0.02, epochs=1, model="mlp", hidden=[64])
    with caplog.at_level(logging.INFO, logger="trainkit"):
        train_run(config)
    saved = json.loads((Path(config.out) / "config.json").read_text())
    assert isinstance(saved["batch_size"], int) and saved["batch_size"] & (saved["batch_size"] - 1) == 0
    assert any(f"--batch-size auto: {saved['batch_size']} (" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------- config/CLI


def test_config_accepts_auto_and_rejects_other_strings():
    assert TrainConfig(batch_size="auto").resolved().batch_size == "auto"
    with pytest.raises(ConfigError, match="--batch-size must be an integer or 'auto'"):
        TrainConfig(batch_size="big").resolved()
    with pytest.raises(ConfigError, match="--memory-budget must be a positive"):
        TrainConfig(memory_budget=0).resolved()


def test_cli_parses_batch_size_auto_and_grad_checkpointing():
    args = build_parser().parse_args(["train", "--batch-size", "auto", "--memory-budget", "2", "--grad-checkpointing"])
    config, _ = train_config_from_args(args)
    assert (config.batch_size, config.memory_budget, config.grad_checkpointing) == ("auto", 2.0, True)


# ------------------------------------------------------- refusing what cannot fit
def test_the_estimate_counts_weights_and_optimizer_state_without_allocating_them():
    estimate = estimate_training_memory(lambda: nn.Sequential(nn.Linear(10**6, 10**6)), "adamw")  # 4 TB if real
    assert estimate.parameters == 10**12 + 10**6
    assert estimate.state_bytes == 16 * estimate.parameters  # weight, gradient, two AdamW moments, fp32
    assert estimate_training_memory(lambda: nn.Linear(3, 2), "sgd").state_bytes == 12 * 8


def test_activations_per_sample_are_every_layer_output_and_leave_no_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5), nn.ReLU()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = torch.randn(8, 3, 4)
    rng = torch.get_rng_state()
    assert activation_bytes_per_sample(model, inputs) == (12 + 5 + 5 + 5) * 4
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_that_cannot_fit_is_refused_naming_the_estimate():
    with pytest.raises(ConfigError, match=r"would need about .* GiB on cpu \(1 parameters: .* activations at batch 10\)"):
        check_model_fits(MemoryEstimate(1, 16, 2**62), torch.device("cpu"), batch_size=10, hint="use less")
    check_model_fits(MemoryEstimate(1, 16, 1024), torch.device("cpu"), batch_size=10, hint="use less")  # fits
