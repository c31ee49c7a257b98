"""EMA, SWA, label smoothing, test-time augmentation and the lr scaling rule, against values
computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainkit.loop.averaging import evaluation_weights
from trainkit.loop.callbacks import Callback, EarlyStopping
from trainkit.config.schema import TrainConfig
from trainkit.data.device import DeviceBatches
from trainkit.errors import ConfigError
from trainkit.optim.optimizers import batch_scaled_lr
from trainkit.recipes.run import train_run
from trainkit.tasks.kinds import Classification, NextToken
from trainkit.loop.trainer import Trainer
from trainkit.recipes.tta import ShiftAveraged


def plain_config(**overrides) -> TrainConfig:
    base = dict(optimizer="sgd", momentum=0.0, lr=0.1, weight_decay=0.0, schedule="constant", clip_norm=None,
                epochs=1, patience=0, device="cpu")  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def toy_data(n: int = 64, features: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen) * 2 + 1
    return x, (x[:, 0] > 1).long()


def bn_model(features: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))


class Recorder(Callback):
    """The live model's state after every optimizer step and at every epoch end."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.epoch_ends: list[dict[str, torch.Tensor]] = []

    def on_batch_end(self, state, loss) -> None:
        self.steps.append({k: v.detach().clone() for k, v in state.model.state_dict().items()})

    def on_epoch_end(self, state) -> None:
        self.epoch_ends.append({k: v.detach().clone() for k, v in state.model.state_dict().items()})


def closed_form_ema(states: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """ema_1 = w_1; ema_t = decay * ema_{t-1} + (1 - decay) * w_t (floats; counters copied)."""
    ema = {k: v.double() if v.is_floating_point() else v for k, v in states[0].items()}
    for state in states[1:]:
        ema = {k: decay * ema[k] + (1 - decay) * v.double() if v.is_floating_point() else v for k, v in state.items()}
    return ema


# ------------------------------------------------------------------------------ EMA
def test_ema_is_the_closed_form_average_of_the_steps_buffers_included():
    x, y = toy_data()
    recorder = Recorder()
    trainer = Trainer(bn_model(), plain_config(ema=0.8, batch_size=16, epochs=2), callbacks=[recorder])
    trainer.fit(DeviceBatches(x, y, 16, seed=1))
    assert len(recorder.steps) == 8
    expected = closed_form_ema(recorder.steps, 0.8)
    averaged = trainer.average.module.state_dict()
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(averaged[key].double(), value, rtol=1e-5, atol=1e-6, msg=key)
        else:  # BatchNorm's num_batches_tracked is a counter: the live value, not an average
            assert torch.equal(averaged[key], value), key
    assert trainer.average.updates == 8 and int(trainer.average.averaged.n_averaged) == 8
    # the EMA moved away from the last step's weights: it is an average, not a copy
    assert not torch.allclose(averaged["0.weight"], recorder.steps[-1]["0.weight"])
    # ... and it is the final model
    torch.testing.assert_close(trainer.model.state_dict()["0.weight"], averaged["0.weight"])


def test_ema_is_what_validation_measures_and_no_eval_average_keeps_the_live_weights():
    x, y = toy_data()
    val = DeviceBatches(x[:32], y[:32], 32, shuffle=False)
    with_ema = Trainer(bn_model(), plain_config(ema=0.9, batch_size=16, epochs=2))
    history = with_ema.fit(DeviceBatches(x, y, 16, seed=1), val)
    assert history[-1]["val_loss"] == pytest.approx(with_ema.evaluate(val)["loss"], rel=1e-6)  # final = EMA

    recorder = Recorder()
    live = Trainer(bn_model(), plain_config(ema=0.9, batch_size=16, epochs=2, eval_average=False), callbacks=[recorder])
    live_history = live.fit(DeviceBatches(x, y, 16, seed=1), val)
    for key, value in recorder.steps[-1].items():
        assert torch.equal(live.model.state_dict()[key], value), key
    assert live_history[-1]["val_loss"] != pytest.approx(history[-1]["val_loss"])


def test_early_stopping_restores_the_best_epochs_ema():
    x, y = toy_data()
    val = DeviceBatches(x[:32], y[:32], 32, shuffle=False)
    stopper = EarlyStopping("val_loss", patience=10)
    trainer = Trainer(bn_model(), plain_config(ema=0.9, batch_size=16, epochs=3), callbacks=[stopper])
    trainer.fit(DeviceBatches(x, y, 16, seed=1), val)
    best = stopper.best_epoch
    assert trainer.state.history[best - 1]["val_loss"] == pytest.approx(trainer.evaluate(val)["loss"], rel=1e-6)


def test_a_checkpoint_evaluates_with_its_ema():
    weights, averaged = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    payload = {"model": weights, "config": {"eval_average": True},
               "average": {"kind": "ema", "updates": 3, "weights": averaged}}  # fmt: skip
    assert evaluation_weights(payload) is averaged
    assert evaluation_weights({**payload, "config": {"eval_average": False}}) is weights
    assert evaluation_weights({**payload, "average": {**payload["average"], "kind": "swa"}}) is weights
    assert evaluation_weights({"model": weights, "config": {}}) is weights


# ------------------------------------------------------------------------------ SWA
def test_swa_averages_epoch_ends_and_recomputes_batch_norm_statistics():
    x, y = toy_data(64)
    recorder = Recorder()
    config = plain_config(swa_start=2, swa_lr=0.05, batch_size=16, epochs=4)
    trainer = Trainer(bn_model(), config, callbacks=[recorder])
    trainer.fit(DeviceBatches(x, y, 16, seed=1))
    ends = recorder.epoch_ends[1:]  # epochs 2, 3, 4
    final = trainer.model.state_dict()
    for key in ("0.weight", "0.bias", "1.weight", "3.weight"):
        torch.testing.assert_close(final[key], torch.stack([e[key] for e in ends]).mean(0), msg=key)
    # update_bn (momentum None) makes running_mean the mean of the batch means: equal batches,
    # so the mean over all training rows of the averaged first layer's output
    with torch.no_grad():
        hidden = x @ final["0.weight"].T + final["0.bias"]
    torch.testing.assert_close(final["1.running_mean"], hidden.mean(0), rtol=1e-5, atol=1e-6)
    assert trainer.swa_applied and "SWA average of epochs 2-4" in trainer.describe_final_weights(None)


def test_swa_lr_anneals_to_the_swa_lr_within_one_epoch_and_holds():
    x, y = toy_data(64)
    lrs: list[float] = []

    class LR(Callback):
        def on_epoch_end(self, state) -> None:
            lrs.append(trainer.optimizer.param_groups[0]["lr"])

    trainer = Trainer(bn_model(), plain_config(swa_start=2, swa_lr=0.02, batch_size=16, epochs=4, lr=0.1), callbacks=[LR()])
    trainer.fit(DeviceBatches(x, y, 16, seed=1))
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[1:] == pytest.approx([0.02, 0.02, 0.02])


# ------------------------------------------------------------------ label smoothing
def test_label_smoothing_loss_is_the_hand_computed_mixture():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    targets = torch.tensor([0, 1])
    s = 0.2
    log_p = torch.log_softmax(logits, dim=1)
    nll = -log_p[torch.arange(2), targets]
    uniform = -log_p.mean(dim=1)
    expected = ((1 - s) * nll + s * uniform).mean()
    assert Classification(label_smoothing=s).loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    tokens = NextToken(label_smoothing=s).loss(logits[None], targets[None])
    assert tokens.item() == pytest.approx(expected.item(), rel=1e-6)
    assert Trainer(nn.Linear(3, 3), plain_config(label_smoothing=s)).task.loss(logits, targets).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"label_smoothing": 1.0}, "--label-smoothing must be in [0, 1)"),
        ({"label_smoothing": 0.1, "task": "regression"}, "applies to cross-entropy tasks"),
        ({"label_smoothing": 0.1, "loss": "NLLLoss"}, "--loss NLLLoss replaces it"),
        ({"ema": 1.0}, "--ema must be in (0, 1)"),
        ({"ema": 0.99, "swa_start": 2, "patience": 0}, "choose one"),
        ({"swa_lr": 0.01}, "give --swa-start EPOCH too"),
        ({"swa_start": 30, "epochs": 10, "patience": 0}, "after the last epoch"),
        ({"swa_start": 2}, "pass --patience 0"),
        ({"lr_scaling": "cube"}, "--lr-scaling must be one of sqrt, linear"),
        ({"lr_scaling": "sqrt", "lr": "auto"}, "drop --lr-scaling"),
        ({"tta": "flips"}, "--tta must be one of shifts"),
        ({"lr_reference_batch": 0}, "--lr-reference-batch must be an integer >= 1"),
    ],
)
def test_nonsense_averaging_settings_are_one_line_errors(settings, message):
    with pytest.raises(ConfigError, match=None) as caught:
        TrainConfig(**{"dataset": "synthetic", **settings}).resolved()
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_tta_refuses_data_without_images(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 200)
    config = TrainConfig(dataset="text", data_file=str(text), model="lstm", task="next_token", tta="shifts",
                         patience=0, out=str(tmp_path / "run"), device="cpu")  # fmt: skip
    with pytest.raises(ConfigError, match="--dataset text has none"):
        train_run(config)
    assert not (tmp_path / "run" / "config.json").exists()


# ------------------------------------------------------------ test-time augmentation
def test_shift_tta_averages_the_logits_of_the_image_and_its_four_one_pixel_shifts():
    image = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # rows 1 2 3 / 4 5 6 / 7 8 9
    f = -1.0
    down = torch.tensor([[f, f, f], [1, 2, 3], [4, 5, 6]])
    up = torch.tensor([[4, 5, 6], [7, 8, 9], [f, f, f]])
    right = torch.tensor([[f, 1, 2], [f, 4, 5], [f, 7, 8]])
    left = torch.tensor([[2, 3, f], [5, 6, f], [8, 9, f]])
    expected = (image[0, 0] + down + up + right + left) / 5
    averaged = ShiftAveraged(nn.Flatten(), fill=f)(image)
    torch.testing.assert_close(averaged, expected.reshape(1, 9))


def test_train_run_reports_tta_beside_the_plain_test(tmp_path):
    config = TrainConfig(dataset="synthetic", epochs=2, tta="shifts", patience=0, out=str(tmp_path / "run"),
                         device="cpu", model="cnn", augment_shift=1)  # fmt: skip
    summary = train_run(config)
    assert 0.0 <= summary["test_tta_accuracy"] <= 1.0 and math.isfinite(summary["test_tta_loss"])
    assert summary["test_tta_loss"] != summary["test_loss"]


# ------------------------------------------------------------------ lr scaling rule
def test_lr_scaling_rules():
    assert batch_scaled_lr(1e-3, 512, 128, "sqrt") == pytest.approx(2e-3)
    assert batch_scaled_lr(1e-3, 512, 128, "linear") == pytest.approx(4e-3)
    assert batch_scaled_lr(1e-3, 32, 128, "linear") == pytest.approx(2.5e-4)
    assert batch_scaled_lr(1e-3, 512, 128, None) == 1e-3


def test_trainer_scales_the_lr_by_the_effective_batch_and_checkpoints_keep_the_lr_typed(tmp_path):
    config = plain_config(lr=0.01, batch_size=32, accumulate=4, lr_scaling="linear", lr_reference_batch=64)
    trainer = Trainer(nn.Linear(6, 2), config, out_dir=tmp_path)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.02)
    assert trainer.state_dict()["config"]["lr"] == 0.01
