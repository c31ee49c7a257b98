"""The training loop: mode discipline, accumulation, clipping, precision, NaN handling."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from trainkit.loop.callbacks import Callback, TrainState
from trainkit.config.schema import TrainConfig
from trainkit.data.device import DeviceBatches
from trainkit import tasks
from trainkit.tasks import labels
from trainkit.errors import ConfigError, DataError, NonFiniteLossError, TrainkitError
from trainkit.loop.steps import group_batches
from trainkit.loop.trainer import Trainer


def plain_config(**overrides) -> TrainConfig:
    """No regularisation, schedule or clipping: the update is plain SGD, easy to reproduce by hand."""
    base = dict(
        optimizer="sgd", momentum=0.0, lr=0.1, weight_decay=0.0, schedule="constant", clip_norm=None,
        epochs=1, patience=0, device="cpu", dropout=0.0, norm="none",
    )  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def toy_data(n: int = 80, features: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return x, y


def toy_model(features: int = 12, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, 3))


def test_group_batches_keeps_a_short_last_group():
    sizes = [len(g) for g in group_batches(range(7), 3)]
    assert sizes == [3, 3, 1]


def test_accumulation_matches_one_big_batch_including_a_partial_last_group():
    x, y = toy_data(80)
    model = toy_model()
    reference = copy.deepcopy(model)
    # 5 micro-batches of 16, accumulate 3: groups of 48 then 32 samples -> 2 optimizer steps.
    trainer = Trainer(model, plain_config(batch_size=16, accumulate=3))
    trainer.fit(DeviceBatches(x, y, 16, shuffle=False))

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for part in (slice(0, 48), slice(48, 80)):
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x[part]), y[part]).backward()
        optimizer.step()

    assert trainer.state.global_step == 2
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_k_accumulated_steps_equal_one_step_of_k_times_the_batch():
    x, y = toy_data(64)
    small, big = toy_model(), toy_model()
    Trainer(small, plain_config(batch_size=16, accumulate=4, epochs=3)).fit(DeviceBatches(x, y, 16, seed=1))
    Trainer(big, plain_config(batch_size=64, epochs=3)).fit(DeviceBatches(x, y, 64, seed=1))
    for got, want in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class ModeRecorder(Callback):
    """Records (training mode, grad enabled, inference mode) at every forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: list[tuple[bool, bool, bool]] = []
        model.register_forward_hook(self._record)

    def _record(self, module, inputs, output) -> None:
        self.seen.append((module.training, torch.is_grad_enabled(), torch.is_inference_mode_enabled()))


def test_train_mode_while_fitting_and_eval_inference_mode_for_validation():
    x, y = toy_data(64)
    model = toy_model()
    recorder = ModeRecorder(model)
    trainer = Trainer(model, plain_config(batch_size=32, epochs=2))
    trainer.fit(DeviceBatches(x, y, 32), DeviceBatches(x[:40], y[:40], 20, shuffle=False))
    # per epoch: 2 training forwards, then 2 validation forwards
    assert recorder.seen == ([(True, True, False)] * 2 + [(False, False, True)] * 2) * 2
    assert not model.training, "fit() must leave the model in eval mode"


def test_predict_refuses_a_model_in_training_mode_and_works_in_eval():
    x, _ = toy_data(10)
    model = toy_model()
    trainer = Trainer(model, plain_config())
    model.train()
    with pytest.raises(TrainkitError, match="training mode"):
        trainer.predict(x)
    model.eval()
    torch.testing.assert_close(trainer.predict(x, batch_size=3), model(x).detach())


class GradProbe(Callback):
    """Reads the gradients the optimizer just used (they stay until the next zero_grad)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.norms: list[float] = []
        self.max_abs: list[float] = []

    def on_batch_end(self, state: TrainState, loss: torch.Tensor) -> None:
        grads = [p.grad for p in self.model.parameters()]
        self.norms.append(torch.nn.utils.get_total_norm(grads).item())
        self.max_abs.append(max(g.abs().max().item() for g in grads))


def unclipped_grad_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    probe = copy.deepcopy(model)
    nn.functional.cross_entropy(probe(x), y).backward()
    return torch.nn.utils.get_total_norm([p.grad for p in probe.parameters()]).item()


def test_clip_norm_bounds_the_norm_and_history_reports_the_pre_clip_value():
    x, y = toy_data(32)
    model = toy_model()
    expected_pre_clip = unclipped_grad_norm(model, x, y)
    probe = GradProbe(model)
    trainer = Trainer(model, plain_config(batch_size=32, clip_norm=0.01), callbacks=[probe])
    history = trainer.fit(DeviceBatches(x, y, 32, shuffle=False))
    assert expected_pre_clip > 0.1
    assert history[0]["grad_norm"] == pytest.approx(expected_pre_clip, rel=1e-5)
    assert history[0]["clip_fraction"] == 1.0
    assert probe.norms[0] == pytest.approx(0.01, rel=1e-4)


def test_clip_value_bounds_every_gradient_element():
    x, y = toy_data(64)
    model = toy_model()
    probe = GradProbe(model)
    trainer = Trainer(model, plain_config(batch_size=16, clip_value=1e-3, epochs=2), callbacks=[probe])
    history = trainer.fit(DeviceBatches(x, y, 16))
    assert max(probe.max_abs) <= 1e-3 + 1e-9
    assert [row["clip_fraction"] for row in history] == [1.0, 1.0]


def test_no_clipping_when_threshold_is_not_reached():
    x, y = toy_data(32)
    history = Trainer(toy_model(), plain_config(batch_size=32, clip_norm=1e6)).fit(DeviceBatches(x, y, 32))
    assert history[0]["clip_fraction"] == 0.0


def test_bf16_autocast_on_cpu_trains_in_bfloat16_as_well_as_fp32():
    x, y = toy_data(256)
    results = {}
    for precision in ("fp32", "bf16"):
        model = toy_model()
        dtypes = []
        model[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
        config = plain_config(batch_size=32, epochs=8, precision=precision, optimizer="adamw", lr=1e-2)
        history = Trainer(model, config).fit(DeviceBatches(x, y, 32), DeviceBatches(x, y, 256, shuffle=False))
        results[precision] = (set(dtypes), history)
        assert all(p.dtype == torch.float32 for p in model.parameters()), "master weights stay fp32"
    assert results["bf16"][0] == {torch.bfloat16}
    assert results["fp32"][0] == {torch.float32}
    bf16, fp32 = results["bf16"][1], results["fp32"][1]
    assert bf16[-1]["train_loss"] < 0.7 * bf16[0]["train_loss"]
    assert bf16[-1]["val_accuracy"] == pytest.approx(fp32[-1]["val_accuracy"], abs=0.03)


def test_fp16_on_cpu_is_refused_with_a_hint():
    with pytest.raises(ConfigError, match="bf16"):
        Trainer(toy_model(), plain_config(precision="fp16"))


class NaNAfter(nn.Module):
    """Cross-entropy that returns NaN from the n-th call on."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, logits, targets):
        self.calls += 1
        loss = nn.functional.cross_entropy(logits, targets)
        return loss * float("nan") if self.calls >= self.n else loss


def test_nonfinite_loss_stops_training_naming_the_step():
    x, y = toy_data(80)
    trainer = Trainer(toy_model(), plain_config(batch_size=16, epochs=3), loss_fn=NaNAfter(8))
    with pytest.raises(NonFiniteLossError, match=r"step 8 \(epoch 2, step 3 of the epoch\)"):
        trainer.fit(DeviceBatches(x, y, 16))
    assert trainer.state.epoch == 2


def test_history_has_every_documented_metric():
    x, y = toy_data(64)
    history = Trainer(toy_model(), plain_config(batch_size=16, epochs=2)).fit(
        DeviceBatches(x, y, 16), DeviceBatches(x, y, 64, shuffle=False)
    )
    for key in ("train_loss", "val_loss", "val_accuracy", "lr", "grad_norm", "clip_fraction",
                "epoch_seconds", "samples_per_second"):  # fmt: skip
        assert key in history[0]
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[0]["samples_per_second"] > 0


class NaNAtSteps(nn.Module):
    """Cross-entropy that returns NaN on chosen calls (1-based); counts every call."""

    def __init__(self, bad_calls: set[int] | None = None, from_call: int | None = None) -> None:
        super().__init__()
        self.bad_calls, self.from_call, self.calls = bad_calls or set(), from_call, 0

    def forward(self, logits, targets):
        self.calls += 1
        loss = nn.functional.cross_entropy(logits, targets)
        bad = self.calls in self.bad_calls or (self.from_call is not None and self.calls >= self.from_call)
        return loss * float("nan") if bad else loss


def test_skip_policy_drops_the_bad_step_counts_it_and_keeps_training():
    x, y = toy_data(80)
    model = toy_model()
    trainer = Trainer(model, plain_config(batch_size=16, epochs=2, on_nonfinite="skip"), loss_fn=NaNAtSteps({3}))
    history = trainer.fit(DeviceBatches(x, y, 16))
    assert [row["skipped_steps"] for row in history] == [1, 0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in history)
    assert trainer.state.global_step == 10


class InfInputsAt(nn.Module):
    """Identity, except that on chosen training calls it makes every input inf (poisoning BatchNorm)."""

    def __init__(self, bad_calls: set[int]) -> None:
        super().__init__()
        self.bad_calls, self.calls = bad_calls, 0

    def forward(self, x):
        if not self.training:
            return x
        self.calls += 1
        return x * float("inf") if self.calls in self.bad_calls else x


def test_a_skipped_step_also_undoes_its_batchnorm_statistics():
    x, y = toy_data(80)
    torch.manual_seed(0)
    model = nn.Sequential(InfInputsAt({3}), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    trainer = Trainer(model, plain_config(batch_size=16, epochs=2, on_nonfinite="skip", max_skipped_steps=1))
    history = trainer.fit(DeviceBatches(x, y, 16))
    assert [row["skipped_steps"] for row in history] == [1, 0]
    norm = model[2]
    assert torch.isfinite(norm.running_mean).all() and torch.isfinite(norm.running_var).all()
    assert int(norm.num_batches_tracked) == 9, "the skipped step's forward pass must not count"


def test_skipping_more_steps_than_the_cap_stops_like_raise():
    x, y = toy_data(80)
    config = plain_config(batch_size=16, epochs=2, on_nonfinite="skip", max_skipped_steps=3)
    trainer = Trainer(toy_model(), config, loss_fn=NaNAtSteps(from_call=2))
    with pytest.raises(NonFiniteLossError, match="4 optimizer steps had a NaN/inf loss.*--max-skipped-steps 3"):
        trainer.fit(DeviceBatches(x, y, 16))
    default_cap = Trainer(toy_model(), plain_config(batch_size=16, on_nonfinite="skip"), loss_fn=NaNAtSteps({1, 2}))
    with pytest.raises(NonFiniteLossError, match="--max-skipped-steps 1;"):  # 10% of 5 steps, at least 1
        default_cap.fit(DeviceBatches(x, y, 16))


def test_an_epoch_whose_steps_were_all_skipped_logs_nan_not_a_perfect_loss():
    x, y = toy_data(80)
    config = plain_config(batch_size=16, on_nonfinite="skip", max_skipped_steps=10)
    history = Trainer(toy_model(), config, loss_fn=NaNAtSteps(from_call=1)).fit(DeviceBatches(x, y, 16))
    assert history[0]["skipped_steps"] == 5
    assert math.isnan(history[0]["train_loss"]) and math.isnan(history[0]["train_accuracy"])


def test_rollback_policy_reloads_and_halves_the_lr(tmp_path):
    x, y = toy_data(80)
    config = plain_config(batch_size=16, epochs=3, on_nonfinite="rollback", schedule="cosine")
    reference = Trainer(toy_model(), config)
    reference.fit(DeviceBatches(x, y, 16))
    # the 8th forward pass (epoch 2, step 3) is NaN once; after the rollback to the end of epoch 1
    trainer = Trainer(toy_model(), config, out_dir=tmp_path, loss_fn=NaNAtSteps({8}))
    history = trainer.fit(DeviceBatches(x, y, 16))
    assert trainer.rollbacks == 1 and trainer.lr_scale == 0.5
    assert trainer.state.global_step == 15 and len(history) == 3
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * reference.optimizer.param_groups[0]["lr"])
    assert history[1]["lr"] == pytest.approx(0.5 * reference.state.history[1]["lr"])


def test_rollback_without_a_checkpoint_uses_the_starting_state_and_gives_up_after_k():
    x, y = toy_data(80)
    config = plain_config(batch_size=16, epochs=2, on_nonfinite="rollback", max_rollbacks=2)
    trainer = Trainer(toy_model(), config, loss_fn=NaNAtSteps(from_call=4))
    with pytest.raises(NonFiniteLossError, match="after 2 rollbacks"):
        trainer.fit(DeviceBatches(x, y, 16))
    assert trainer.rollbacks == 2 and trainer.lr_scale == 0.25


class PoisonWeights(Callback):
    def on_epoch_end(self, state):
        if state.epoch == 2:
            with torch.no_grad():
                next(state.model.parameters())[0, 0] = float("nan")


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_non_finite_weights_stop_the_run_are_never_saved_and_never_rank_best(tmp_path, policy):
    x, y = toy_data(64)
    config = plain_config(batch_size=16, epochs=3, on_nonfinite=policy)
    trainer = Trainer(toy_model(), config, out_dir=tmp_path, callbacks=[PoisonWeights()])
    with pytest.raises(NonFiniteLossError, match="weights or buffers hold NaN/inf after epoch 2"):
        trainer.fit(DeviceBatches(x, y, 16), DeviceBatches(x, y, 64, shuffle=False))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "epoch-0001.pt"]
    assert not trainer._is_new_best({"val_loss": float("nan")})
    assert trainer.best_epoch == 1, "epoch 2's weights are NaN, so it cannot be the best"


def test_trainer_lr_find_uses_its_model_and_leaves_no_trace():
    x, y = toy_data(256)
    model = toy_model()
    trainer = Trainer(model, plain_config(batch_size=32, optimizer="adamw", lr=1e-3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = trainer.lr_find(DeviceBatches(x, y, 32), num_iter=30, end_lr=1.0)
    assert len(result.lrs) >= 5 and 1e-7 <= result.suggested_lr <= 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-3


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )


def image_data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, 8, 8, generator=gen)
    return x, (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long()


def test_channels_last_trains_the_same_model_with_nhwc_weights_and_plain_state_dict():
    x, y = image_data()
    results = {}
    for channels_last in (False, True):
        trainer = Trainer(small_cnn(), plain_config(batch_size=16, epochs=2, channels_last=channels_last))
        trainer.fit(DeviceBatches(x, y, 16, shuffle=False))
        results[channels_last] = trainer
    conv = results[True].model[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for (key, want), (key2, got) in zip(results[False].model.state_dict().items(), results[True].model.state_dict().items()):
        assert key == key2
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_compiled_forward_matches_eager_and_keeps_plain_state_dict_keys():
    x, y = toy_data()
    eager = Trainer(toy_model(), plain_config(batch_size=16, epochs=2))
    eager.fit(DeviceBatches(x, y, 16, shuffle=False))
    compiled = Trainer(toy_model(), plain_config(batch_size=16, epochs=2, compile=True))
    compiled.fit(DeviceBatches(x, y, 16, shuffle=False))
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())  # no "_orig_mod." prefix
    for got, want in zip(compiled.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------ the user's data: labels, shapes, dtypes (W-1)
class Rows(torch.utils.data.Dataset):
    """A map-style dataset over tensors (not a TensorDataset: trainkit reads it sample by sample)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]


def labels_with(row: int, value: int, n: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = toy_data(n)
    y[row] = value
    return x, y


def test_a_label_outside_the_models_classes_is_one_data_error_naming_the_step_and_value():
    x, y = labels_with(70, 3)  # the toy model has 3 classes: 0-2
    trainer = Trainer(toy_model(), plain_config(batch_size=16, epochs=2))
    with pytest.raises(DataError) as caught:
        trainer.fit(Rows(x, y))
    message = str(caught.value)
    assert message.startswith("the training batch of optimizer step ") and "(epoch 1): row " in message
    assert message.endswith("has label 3, but the model has 3 outputs (classes 0-2): fix the labels, or give the model 4 outputs")


def test_where_the_loss_cannot_refuse_a_label_the_guard_keeps_it_out_and_stops_at_the_next_check(monkeypatch):
    """CUDA's cross-entropy asserts on the device instead of raising: the LabelGuard path (forced on the CPU)."""
    monkeypatch.setattr(labels, "loss_refuses_bad_labels", lambda targets: False)
    x, y = labels_with(70, 5)
    trainer = Trainer(toy_model(), plain_config(batch_size=16, epochs=2))
    with pytest.raises(DataError, match=r"^a training batch of epoch 1 \(optimizer steps 1-5\) holds label 5, but the "
                                         r"model has 3 outputs \(classes 0-2\)"):  # fmt: skip
        trainer.fit(Rows(x, y))
    assert trainer.state.global_step == 5 and all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_the_guard_passes_good_labels_unchanged_and_masks_bad_ones(monkeypatch):
    monkeypatch.setattr(labels, "loss_refuses_bad_labels", lambda targets: False)
    guard = tasks.LabelGuard(-100)
    assert guard(torch.tensor([0, 2, -100, 1]), 3).tolist() == [0, 2, -100, 1]
    assert guard(torch.tensor([-1, 3, 7, 2]), 3).tolist() == [-100, -100, -100, 2]
    seen = guard.take(training=True)
    assert (seen.no_target, seen.lowest, seen.highest, seen.classes) == (False, -1, 7, 3)
    assert seen.out_of_range().startswith("label -1: class labels are indices from 0 to 3 (the model's outputs) minus 1")
    assert guard.take(training=True) is None  # read once


def test_a_validation_label_outside_the_classes_names_the_validation():
    x, y = toy_data(80)
    vx, vy = labels_with(5, 9, n=32)
    trainer = Trainer(toy_model(), plain_config(batch_size=16, epochs=2))
    with pytest.raises(DataError, match=r"^validation after epoch 1: row 5 of the batch has label 9, but the model has 3 outputs"):
        trainer.fit(DeviceBatches(x, y, 16), Rows(vx, vy))


@pytest.mark.parametrize(
    "labels, message",
    [
        (lambda y: y.float(), "training samples 0-79: sample 0 has label 0 (float32): classification needs integer class indices"),
        (lambda y: y.int(), "training samples 0-79: its labels are int32: the cross-entropy loss takes torch.long class indices: return torch.long labels"),
        (lambda y: y.index_fill(0, torch.tensor([33]), -1), "training samples 0-79: sample 33 has label -1: class labels are indices from 0"),
        (lambda y: torch.full_like(y, -100), "training samples 0-79: no target in these samples: every label is the ignore index -100 (padding), "
                                             "so the loss is NaN; give it real labels or leave such batches out (a lower lr would not help)"),
    ],
)
def test_labels_the_loss_cannot_take_are_refused_before_the_first_step(labels, message):
    x, y = toy_data(80)
    trainer = Trainer(toy_model(), plain_config(batch_size=16))
    with pytest.raises(DataError) as caught:
        trainer.fit(torch.utils.data.TensorDataset(x, labels(y)))
    assert str(caught.value).startswith(message) and trainer.state.global_step == 0


def test_a_batch_with_no_target_later_in_training_says_so_not_lower_the_lr():
    """G11: every label the ignore index gives a NaN loss; the message was "Try a lower --lr"."""
    x, y = toy_data(64)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    batches[2] = (batches[2][0], torch.full((16,), -100))
    trainer = Trainer(toy_model(), plain_config(batch_size=16))
    with pytest.raises(DataError, match=r"^the training loss became NaN at optimizer step 3: no target in a training batch "
                                         r"of epoch 1 \(optimizer steps 1-4\): every label is the ignore index -100"):  # fmt: skip
        trainer.fit(batches)


def test_ragged_and_lying_datasets_are_one_line_naming_the_sample():
    x, y = toy_data(80)

    class Ragged(Rows):
        def __getitem__(self, index):
            return (torch.randn(13) if index == 7 else self.x[index]), self.y[index]

    class Lying(Rows):
        def __len__(self):
            return 100

    with pytest.raises(DataError, match=r"^training sample 7 is tuple\(Tensor\[13\], Tensor\[\]\) but sample 0 "
                                         r"is tuple\(Tensor\[12\], Tensor\[\]\): every sample needs the same"):  # fmt: skip
        Trainer(toy_model(), plain_config(batch_size=16)).fit(Ragged(x, y))
    with pytest.raises(DataError, match=r"^training sample 99 cannot be read \(index 99 is out of bounds .*\) although "
                                         r"its __len__ says 100: make __len__ return the number of samples"):  # fmt: skip
        Trainer(toy_model(), plain_config(batch_size=16)).fit(Lying(x, y))


def test_a_ragged_sample_after_the_checked_ones_names_the_step():
    x, y = toy_data(160)

    class LateRagged(Rows):
        def __getitem__(self, index):
            return (torch.randn(13) if index == 150 else self.x[index]), self.y[index]

    with pytest.raises(DataError, match=r"^the training batch of optimizer step \d+ \(epoch 1\): sample \d+ of the batch is "):
        Trainer(toy_model(), plain_config(batch_size=16)).fit(LateRagged(x, y))


def test_float64_features_are_refused_for_a_float32_model_and_train_a_float64_one():
    x, y = toy_data(80)
    data = torch.utils.data.TensorDataset(x.double(), y)
    with pytest.raises(DataError, match=r"^training samples 0-79: its features are float64 but the model's parameters are "
                                         r"float32: return float32 tensors \(x.float\(\)\), or build the model in float64"):  # fmt: skip
        Trainer(toy_model(), plain_config(batch_size=16)).fit(data)
    history = Trainer(toy_model().double(), plain_config(batch_size=16)).fit(data)
    assert math.isfinite(history[-1]["train_loss"])


def test_the_checks_leave_the_runs_random_streams_alone():
    """Reading samples with augmentation before training must not change what the run trains on."""
    x, y = toy_data(80)

    class Augmenting(Rows):
        def __getitem__(self, index):
            return self.x[index] + 0.1 * torch.randn(12), self.y[index]

    torch.manual_seed(3)
    before = torch.get_rng_state()
    tasks.check_data(tasks.build_task("classification"), Augmenting(x, y), "training")
    assert torch.equal(torch.get_rng_state(), before)


# --------------------------------------------------------- NaN validation metrics (W-2)
def nan_validation(n: int = 32) -> DeviceBatches:
    vx, vy = toy_data(n, seed=1)
    vx[3, 2] = float("nan")
    return DeviceBatches(vx, vy, 16, shuffle=False)


def test_a_nan_validation_metric_is_a_warning_and_never_the_best(caplog):
    x, y = toy_data(80)
    trainer = Trainer(toy_model(), plain_config(batch_size=16, epochs=2))
    with caplog.at_level("WARNING", logger="trainkit"):
        history = trainer.fit(DeviceBatches(x, y, 16), nan_validation())
    assert all(math.isnan(row["val_loss"]) for row in history)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w.split(":")[0] for w in warnings] == ["validation after epoch 1 gave val_loss nan", "validation after epoch 2 gave val_loss nan"]
    assert trainer.best_epoch is None and trainer.best_metric is None


def test_the_plateau_schedule_is_not_fed_nan(caplog):
    """J2: ReduceLROnPlateau took NaN as "no improvement" and cut the lr every epoch."""
    x, y = toy_data(80)
    config = plain_config(batch_size=16, epochs=3, schedule="plateau", plateau_patience=0, lr=0.05)
    with caplog.at_level("WARNING", logger="trainkit"):
        history = Trainer(toy_model(), config).fit(DeviceBatches(x, y, 16), nan_validation())
    assert [row["lr"] for row in history] == [0.05, 0.05, 0.05]
    assert "the plateau schedule skips it" in caplog.text


def test_plateau_schedule_skips_non_finite_metrics():
    from trainkit.optim.schedules import ScheduleSpec, build_scheduler

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = build_scheduler(ScheduleSpec("plateau", plateau_patience=0, plateau_factor=0.5), optimizer, total_steps=10)
    for value in (1.0, float("nan"), float("inf"), 0.5):
        schedule.step_metric(value)
    assert optimizer.param_groups[0]["lr"] == 1.0
    schedule.step_metric(0.9)
    assert optimizer.param_groups[0]["lr"] == 0.5
