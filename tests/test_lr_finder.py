"""The LR range test: the sweep, its suggestions, and that it leaves no trace at all."""

from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from trainkit.data.device import DeviceBatches
from trainkit.recipes.images import load_dataset
from trainkit.errors import ConfigError, TrainkitError
from trainkit.optim.lr_finder import (
    LRFinderResult, lr_find, smooth_losses, suggest_lrs, suggest_minimum_div_10, suggest_steepest, suggest_valley, sweep_lrs,
)  # fmt: skip
from trainkit.nn.models import mlp

# ------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and a busy 2-core machine makes them spin for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    split = load_dataset("synthetic", val_size=0, seed=0).train
    return split.x[:1024], split.y[:1024]


def batches_of(data, batch_size: int = 64, seed: int = 0) -> DeviceBatches:
    x, y = data
    return DeviceBatches(x, y, batch_size, seed=seed)


def make_model(seed: int = 0, *, dropout: float = 0.2, norm: str = "batch") -> nn.Module:
    torch.manual_seed(seed)
    return mlp(hidden=(32,), norm=norm, dropout=dropout)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def train_steps(model, optimizer, batches, steps: int, epoch: int = 0) -> None:
    """Plain training steps (what a Trainer would do next)."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    for _, (x, y) in zip(range(steps), batches.epoch(epoch)):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()


def seed_other_rngs() -> None:
    random.seed(11)
    random.random()
    np.random.seed(12)
    np.random.rand()


def capture(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "modes": [m.training for m in model.modules()],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
    }


def assert_same_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert tensor.dtype == after[name].dtype, name
        assert torch.equal(tensor, after[name]), name


def assert_same_state(before: dict, after: dict) -> None:
    assert_same_tensors(before["params"], after["params"])
    assert_same_tensors(before["buffers"], after["buffers"])
    assert before["modes"] == after["modes"]
    opt_before, opt_after = before["optimizer"], after["optimizer"]
    assert opt_before["param_groups"] == opt_after["param_groups"]  # lr, betas, weight_decay, ...
    assert opt_before["state"].keys() == opt_after["state"].keys()
    for index, state in opt_before["state"].items():
        assert_same_tensors(state, opt_after["state"][index])
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert before["python_rng"] == after["python_rng"]
    for a, b in zip(before["numpy_rng"], after["numpy_rng"]):
        assert np.array_equal(a, b)


class Spy:
    """A loss function that records the lr, the BatchNorm step count and the batch it sees.

    It also draws from Python's and NumPy's RNGs, as a data pipeline might, so that a finder
    that forgot to restore them fails the no-trace tests.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, fail_at: int | None = None,
                 nan_at: int | None = None) -> None:  # fmt: skip
        self.model, self.optimizer = model, optimizer
        self.fail_at, self.nan_at = fail_at, nan_at
        self.calls = 0
        self.lrs: list[float] = []
        self.bn_steps: list[int] = []
        self.targets: list[torch.Tensor] = []
        self.inner = nn.CrossEntropyLoss()

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        random.random()
        np.random.rand()
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("loss function failed")
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        self.bn_steps.append(next(int(b) for n, b in self.model.named_buffers() if "num_batches" in n))
        self.targets.append(targets)
        loss = self.inner(logits, targets)
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return loss


def trained_setup(data, *, norm: str = "batch"):
    """A model + AdamW after two real steps (so the optimizer has exp_avg etc.) in a mixed mode."""
    model = make_model(norm=norm)
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, batches_of(data), 2)
    model.eval()
    model[1].train()  # per-module modes must come back exactly, not just the top-level flag
    seed_other_rngs()
    return model, optimizer


# ------------------------------------------------------------------------------ no trace


def test_lr_find_leaves_no_trace(data):
    model, optimizer = trained_setup(data)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    scheduler_before = copy.deepcopy(scheduler.state_dict())
    before = capture(model, optimizer)
    spy = Spy(model, optimizer)

    result = lr_find(model, optimizer, batches_of(data), spy, num_iter=60)

    # the sweep really trained: lr rose, BatchNorm counted steps, and the optimizer had state
    assert spy.calls == len(result.losses) >= 50
    assert spy.lrs[-1] > 1000 * spy.lrs[0]
    assert spy.bn_steps[-1] > spy.bn_steps[0]
    assert before["optimizer"]["state"][0]["exp_avg"].abs().sum() > 0
    assert_same_state(before, capture(model, optimizer))
    assert all(p.grad is None for p in model.parameters())
    assert scheduler.state_dict() == scheduler_before
    assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0]


def test_no_trace_when_the_loss_function_raises_mid_sweep(data):
    model, optimizer = trained_setup(data)
    before = capture(model, optimizer)
    spy = Spy(model, optimizer, fail_at=25)
    with pytest.raises(RuntimeError, match="loss function failed"):
        lr_find(model, optimizer, batches_of(data), spy, num_iter=50)
    assert spy.bn_steps[-1] > spy.bn_steps[0]  # it had changed the model before failing
    assert_same_state(before, capture(model, optimizer))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("options", [{"accumulate": 2}, {"precision": "bf16"}], ids=["accumulate", "bf16"])
def test_no_trace_with_accumulation_and_bf16(data, options):
    model, optimizer = trained_setup(data)
    before = capture(model, optimizer)
    spy = Spy(model, optimizer)
    result = lr_find(model, optimizer, batches_of(data), spy, num_iter=30, end_lr=1e-1, **options)
    assert len(result.losses) == 30
    assert spy.calls == 30 * options.get("accumulate", 1)
    assert all(math.isfinite(v) for v in result.losses)
    assert_same_state(before, capture(model, optimizer))


def test_training_after_lr_find_is_bit_identical(data):
    batches = batches_of(data)
    with_finder, without = make_model(dropout=0.3), make_model(dropout=0.3)
    opt_with, opt_without = make_optimizer(with_finder), make_optimizer(without)
    for model, optimizer in ((with_finder, opt_with), (without, opt_without)):
        torch.manual_seed(1)
        train_steps(model, optimizer, batches, 2)

    torch.manual_seed(5)
    lr_find(with_finder, opt_with, batches, nn.CrossEntropyLoss(), num_iter=40)
    train_steps(with_finder, opt_with, batches, 5, epoch=1)  # dropout draws from the global RNG
    torch.manual_seed(5)
    train_steps(without, opt_without, batches, 5, epoch=1)

    for (name, a), b in zip(with_finder.state_dict().items(), without.state_dict().values()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------------- sweep


def test_exp_sweep_is_geometric_and_sets_the_lr(data):
    model = make_model()
    optimizer = make_optimizer(model)
    spy = Spy(model, optimizer)
    result = lr_find(model, optimizer, batches_of(data), spy, start_lr=1e-5, end_lr=1e-1, num_iter=21,
                     diverge_factor=math.inf)  # fmt: skip
    assert result.lrs[0] == 1e-5
    assert result.lrs[-1] == pytest.approx(1e-1, rel=1e-12)
    ratios = np.array(result.lrs[1:]) / np.array(result.lrs[:-1])
    assert ratios == pytest.approx(np.full(20, 10 ** (4 / 20)), rel=1e-12)
    assert spy.lrs == result.lrs  # every param group really used the recorded lr


def test_linear_sweep_is_evenly_spaced(data):
    model = make_model()
    optimizer = make_optimizer(model)
    result = lr_find(model, optimizer, batches_of(data), nn.CrossEntropyLoss(), start_lr=1e-4, end_lr=1e-2,
                     num_iter=11, mode="linear")  # fmt: skip
    assert result.lrs[0] == 1e-4 and result.lrs[-1] == pytest.approx(1e-2, rel=1e-12)
    assert np.diff(result.lrs) == pytest.approx(np.full(10, 9.9e-4), rel=1e-9)
    assert sweep_lrs(1.0, 3.0, 3, "linear") == [1.0, 2.0, 3.0]


def test_num_iter_is_respected_without_divergence(data):
    model = make_model()
    optimizer = make_optimizer(model)
    spy = Spy(model, optimizer)
    result = lr_find(model, optimizer, batches_of(data), spy, end_lr=1e-2, num_iter=30)
    assert not result.stopped_early
    assert len(result.lrs) == len(result.losses) == len(result.smoothed_losses) == spy.calls == 30


def test_divergence_stops_early_and_suggestions_stay_below_it(data):
    model = make_model()
    optimizer = make_optimizer(model)
    start_lr, end_lr = 1e-6, 1e4
    result = lr_find(model, optimizer, batches_of(data), nn.CrossEntropyLoss(), start_lr=start_lr,
                     end_lr=end_lr, num_iter=100)  # fmt: skip
    assert result.stopped_early
    assert 10 < len(result.losses) < 100
    assert result.smoothed_losses[-1] > 4 * min(result.smoothed_losses)
    diverged_at = result.lrs[-1]
    assert set(result.suggestions) == {"between", "steepest", "minimum_div_10", "valley"}
    for name, lr in result.suggestions.items():
        assert start_lr <= lr <= end_lr, name
        assert lr < diverged_at, name
    assert result.suggested_lr == result.suggestions["between"]
    between = result.suggestions["between"]
    assert between == pytest.approx(math.sqrt(result.suggestions["steepest"] * result.suggestions["minimum_div_10"]))
    second = make_model()
    other = lr_find(second, make_optimizer(second), batches_of(data), nn.CrossEntropyLoss(),
                    start_lr=start_lr, end_lr=end_lr, num_iter=100, rule="valley")  # fmt: skip
    assert other.suggested_lr == other.suggestions["valley"]


def test_a_rising_finite_loss_stops_the_sweep_at_the_diverge_factor(data):
    calls = 0

    def rising_after_30(logits, targets):
        nonlocal calls
        calls += 1
        return nn.functional.cross_entropy(logits, targets) + 100.0 * max(0, calls - 30)

    model = make_model()
    optimizer = make_optimizer(model)
    result = lr_find(model, optimizer, batches_of(data), rising_after_30, end_lr=1e-3, num_iter=100)
    assert result.stopped_early
    assert 30 < len(result.losses) < 40
    assert result.smoothed_losses[-1] > 4 * min(result.smoothed_losses) >= result.smoothed_losses[-2]
    assert all(math.isfinite(v) for v in result.losses)


def test_nan_loss_stops_the_sweep_without_recording_it(data):
    model = make_model()
    optimizer = make_optimizer(model)
    result = lr_find(model, optimizer, batches_of(data), Spy(model, optimizer, nan_at=21), num_iter=50)
    assert result.stopped_early
    assert len(result.losses) == 20
    assert all(math.isfinite(v) for v in result.losses + result.smoothed_losses)


def test_immediate_divergence_asks_for_a_lower_start_lr(data):
    model, optimizer = trained_setup(data)
    before = capture(model, optimizer)
    with pytest.raises(TrainkitError, match="lower start_lr"):
        lr_find(model, optimizer, batches_of(data), Spy(model, optimizer, nan_at=3), num_iter=50)
    assert_same_state(before, capture(model, optimizer))


def test_a_short_iterable_is_re_iterated(data):
    x, y = data
    short = [(x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8]) for i in range(3)]
    model = make_model()
    optimizer = make_optimizer(model)
    spy = Spy(model, optimizer)
    result = lr_find(model, optimizer, short, spy, end_lr=1e-2, num_iter=10)
    assert len(result.losses) == spy.calls == 10
    seen = [next(i for i, (_, yb) in enumerate(short) if yb is t) for t in spy.targets]
    assert seen == [0, 1, 2] * 3 + [0]


def test_device_batches_are_read_epoch_after_epoch(data):
    epochs_read: list[int] = []

    class CountingBatches(DeviceBatches):
        def epoch(self, epoch, start_batch=0):
            epochs_read.append(epoch)
            return super().epoch(epoch, start_batch)

    x, y = data
    batches = CountingBatches(x[:256], y[:256], 64)  # 4 batches per epoch
    model = make_model()
    optimizer = make_optimizer(model)
    spy = Spy(model, optimizer)
    lr_find(model, optimizer, batches, spy, end_lr=1e-2, num_iter=10)
    assert spy.calls == 10
    assert epochs_read == [0, 1, 2]


def test_an_exhausted_iterator_is_a_clear_error(data):
    x, y = data
    used_up = iter([(x[:8], y[:8])])
    model, optimizer = trained_setup(data)
    before = capture(model, optimizer)
    with pytest.raises(ConfigError, match="no batches"):
        lr_find(model, optimizer, used_up, nn.CrossEntropyLoss(), num_iter=5)
    assert_same_state(before, capture(model, optimizer))


def test_accumulation_weights_micro_batches_by_size(data):
    """Two uneven micro-batches (10 + 30 samples): the recorded loss is the mean over all 40."""
    x, y = data
    model = make_model(norm="none", dropout=0.0)
    optimizer = make_optimizer(model)
    micro = [(x[:10], y[:10]), (x[10:40], y[10:40])]
    expected = nn.functional.cross_entropy(model(x[:40]), y[:40]).item()
    result = lr_find(model, optimizer, micro, nn.CrossEntropyLoss(), num_iter=2, accumulate=2)
    assert result.losses[0] == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------- smoothing


def test_bias_corrected_ema_of_a_constant_is_the_constant_from_the_first_step():
    assert smooth_losses([2.5] * 10, beta=0.98) == pytest.approx([2.5] * 10, rel=1e-12)


def test_bias_corrected_ema_by_hand():
    # beta 0.5: avg1 = 0.5 -> 0.5 / 0.5 = 1; avg2 = 0.25 + 1.5 = 1.75 -> 1.75 / 0.75
    assert smooth_losses([1.0, 3.0], beta=0.5) == pytest.approx([1.0, 1.75 / 0.75], rel=1e-12)
    assert smooth_losses([4.0, 1.0, 7.0], beta=0.0) == [4.0, 1.0, 7.0]


# -------------------------------------------------------------------------- suggestions


def u_curve() -> tuple[list[float], list[float]]:
    """Loss vs log10(lr) on -6..0 (step 0.05): steepest fall at 1e-3, minimum at 10**-1.5, then up."""
    log_lrs = np.round(np.arange(121) * 0.05 - 6.0, 10)
    losses = 2.0 - np.tanh(2.0 * (log_lrs + 3.0)) + 2.0 * np.maximum(0.0, log_lrs + 1.5) ** 2
    return list(10.0**log_lrs), list(losses)


def test_steepest_lands_on_the_steepest_fall():
    lrs, losses = u_curve()
    assert suggest_steepest(lrs, losses) == pytest.approx(1e-3, rel=1e-9)


def test_steepest_ignores_the_noisy_first_tenth():
    lrs, losses = u_curve()
    losses = [losses[0] + 50.0] + losses[1:]  # a huge drop between the first two points
    assert suggest_steepest(lrs, losses) == pytest.approx(1e-3, rel=1e-9)


def test_minimum_div_10_is_a_tenth_of_the_minimum():
    lrs, losses = u_curve()
    assert suggest_minimum_div_10(lrs, losses) == pytest.approx(10**-1.5 / 10, rel=1e-9)


def test_valley_lands_halfway_down_the_longest_valley():
    lrs, losses = u_curve()  # the valley runs from index 0 to the minimum at index 90
    assert suggest_valley(lrs, losses) == pytest.approx(lrs[0 + 30 + 15], rel=1e-12)


def test_valley_skips_a_noisy_bump_for_the_longer_valley():
    losses = [3.0, 2.0, 3.5, 3.4, 3.3, 3.2, 3.1, 3.0, 2.9, 2.8, 5.0]
    lrs = [10.0**-i for i in range(11, 0, -1)]
    # longest decreasing subsequence: indices 2..9 (8 points), not 0..1; pick 2 + int(7/3) + int(7/6)
    assert suggest_valley(lrs, losses) == lrs[2 + 2 + 1]


def test_suggestions_fall_back_on_short_or_rising_curves():
    short_lrs, short = [1e-4, 1e-3, 1e-2], [2.0, 1.0, 1.5]
    assert suggest_steepest(short_lrs, short) == suggest_valley(short_lrs, short) == pytest.approx(1e-4)
    rising_lrs = [10.0**-i for i in range(8, 0, -1)]
    rising = [1.0 + i for i in range(8)]
    expected = suggest_minimum_div_10(rising_lrs, rising)
    assert expected == rising_lrs[0]  # never below the first lr swept
    assert suggest_steepest(rising_lrs, rising) == expected
    assert suggest_valley(rising_lrs, rising) == expected


def test_suggestions_ignore_the_divergent_tail():
    lrs, losses = u_curve()
    tail = list(losses[:100]) + [0.5] * 5  # a nonsense tail after divergence must not be picked
    all_lrs = lrs[:105]
    assert suggest_lrs(all_lrs, tail, stopped_early=True)["minimum_div_10"] == pytest.approx(10**-2.5, rel=1e-9)
    assert suggest_lrs(all_lrs, tail, stopped_early=False)["minimum_div_10"] > 10**-2.5


# -------------------------------------------------------------------------------- output


def test_to_dict_is_json_and_plot_writes_a_png(data, tmp_path):
    model = make_model()
    optimizer = make_optimizer(model)
    result = lr_find(model, optimizer, batches_of(data), nn.CrossEntropyLoss(), num_iter=40)
    loaded = json.loads(json.dumps(result.to_dict()))
    assert set(loaded) == {"lrs", "losses", "smoothed_losses", "suggestions", "suggested_lr", "stopped_early"}
    assert loaded["suggested_lr"] == result.suggested_lr
    assert loaded["lrs"] == result.lrs
    path = result.plot(tmp_path / "plots" / "lr_find.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


def test_result_is_a_plain_dataclass():
    result = LRFinderResult([1e-3], [1.0], [1.0], {"valley": 1e-3}, 1e-3, False)
    assert result.to_dict()["suggestions"] == {"valley": 1e-3}


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"start_lr": 0.0}, "start_lr"),
        ({"start_lr": -1e-3}, "start_lr"),
        ({"start_lr": 1.0, "end_lr": 1.0}, "end_lr"),
        ({"end_lr": 1e-8}, "end_lr"),
        ({"num_iter": 1}, "num_iter"),
        ({"num_iter": 2.5}, "num_iter"),
        ({"smooth": 1.0}, "smooth"),
        ({"smooth": -0.1}, "smooth"),
        ({"diverge_factor": 1.0}, "diverge_factor"),
        ({"mode": "cosine"}, "mode"),
        ({"precision": "fp8"}, "precision"),
        ({"accumulate": 0}, "accumulate"),
        ({"precision": "fp16", "device": "cpu"}, "fp16"),
        ({"device": "meta"}, "device"),
    ],
)
def test_bad_arguments_are_config_errors(data, options, setting):
    model, optimizer = trained_setup(data)
    before = capture(model, optimizer)
    with pytest.raises(ConfigError, match=setting):
        lr_find(model, optimizer, batches_of(data), nn.CrossEntropyLoss(), **options)
    assert_same_state(before, capture(model, optimizer))
