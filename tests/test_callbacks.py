"""Early stopping: the decision rules (Keras 3's), and restoring the best epoch's exact weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainkit.loop.callbacks import EarlyStopping, TrainState, clone_state_dict
from trainkit.errors import ConfigError


def run_epochs(stopper: EarlyStopping, values: list[float], model: nn.Module | None = None) -> tuple[TrainState, list]:
    """Feed a metric sequence; the weights change in place each epoch as an optimizer would."""
    model = model or nn.Linear(4, 2)
    state = TrainState(model=model)
    snapshots = []
    for epoch, value in enumerate(values, start=1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(epoch))  # in-place, like optimizer.step()
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        state.epoch, state.metrics = epoch, {"val_loss": value, "val_accuracy": 1 - value}
        stopper.on_validation_end(state)
        if state.stop_requested:
            break
    return state, snapshots


def test_stops_after_patience_epochs_without_improvement():
    stopper = EarlyStopping(patience=2)
    state, _ = run_epochs(stopper, [1.0, 0.5, 0.7, 0.8, 0.1])
    assert state.stop_requested and state.epoch == 4
    assert stopper.best == 0.5 and stopper.best_epoch == 2


def test_restores_the_best_epochs_exact_weights_not_an_alias():
    model = nn.Linear(4, 2)
    stopper = EarlyStopping(patience=2, restore_best_weights=True)
    state, snapshots = run_epochs(stopper, [1.0, 0.5, 0.7, 0.8], model)
    stopper.on_fit_end(state)
    restored = model.state_dict()
    for key in restored:
        assert torch.equal(restored[key], snapshots[1][key]), "must be epoch 2's weights"
        assert not torch.equal(restored[key], snapshots[-1][key])


def test_a_shallow_state_dict_copy_would_alias_live_weights():
    """Documents the bug the clone guards against: state_dict().copy() tensors change with training."""
    model = nn.Linear(4, 2)
    shallow, deep = model.state_dict().copy(), clone_state_dict(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert torch.equal(shallow["weight"], model.weight)
    assert not torch.equal(deep["weight"], model.weight)


def test_mode_max_and_min_delta():
    stopper = EarlyStopping(monitor="val_accuracy", mode="max", patience=2, min_delta=0.05)
    # accuracies 0.0, 0.5, 0.52 (not enough), 0.53 (not enough) -> stop at epoch 4
    state, _ = run_epochs(stopper, [1.0, 0.5, 0.48, 0.47])
    assert state.stop_requested and state.epoch == 4 and stopper.best_epoch == 2


def test_baseline_improvements_that_miss_it_still_count_towards_patience():
    """Keras 3: an improvement that does not beat the baseline records the best but does not reset
    wait; a later epoch that does not improve then stops at once."""
    stopper = EarlyStopping(patience=2, baseline=0.3)
    state, _ = run_epochs(stopper, [0.5, 0.4, 0.45])
    assert state.stop_requested and state.epoch == 3 and stopper.wait == 3
    assert stopper.best == 0.4 and stopper.best_epoch == 2


def test_beating_the_baseline_resets_patience():
    stopper = EarlyStopping(patience=2, baseline=0.3)
    state, _ = run_epochs(stopper, [0.5, 0.2, 0.25, 0.26, 0.27])
    assert state.stop_requested and state.epoch == 4 and stopper.best_epoch == 2


def test_a_nan_validation_is_never_the_best_epoch_and_the_stop_says_why():
    """J3: a NaN first validation was reported as "best inf at epoch 1" and its weights restored."""
    model = nn.Linear(4, 2)
    stopper = EarlyStopping(patience=2)
    state, snapshots = run_epochs(stopper, [float("nan"), float("nan")], model)
    assert state.stop_requested and stopper.best_epoch is None and stopper.best_weights is None
    assert state.stop_reason == ("early stopping: val_loss has not improved for 2 validations, 2 of them "
                                 "non-finite (no validation gave a finite val_loss)")  # fmt: skip
    stopper.on_fit_end(state)
    assert torch.equal(model.weight, snapshots[-1]["weight"])  # nothing restored: the last weights stay


def test_a_finite_validation_after_a_nan_one_is_the_best():
    model = nn.Linear(4, 2)
    stopper = EarlyStopping(patience=2)
    state, snapshots = run_epochs(stopper, [float("nan"), 0.7, float("inf"), 0.9], model)
    assert state.stop_requested and state.epoch == 4 and (stopper.best, stopper.best_epoch) == (0.7, 2)
    assert state.stop_reason.endswith("for 2 validations, 1 of them non-finite (best 0.7 at epoch 2)")
    stopper.on_fit_end(state)
    assert torch.equal(model.weight, snapshots[1]["weight"])


def test_patience_zero_stops_at_the_first_epoch_without_improvement():
    state, _ = run_epochs(EarlyStopping(patience=0), [1.0, 0.5, 0.6, 0.1])
    assert state.stop_requested and state.epoch == 3


def test_mode_auto_reads_the_direction_from_the_name():
    assert EarlyStopping("val_loss").mode == "min"
    assert EarlyStopping("val_top5_accuracy").mode == "max"
    assert EarlyStopping("train_r2").mode == "max" and EarlyStopping("val_perplexity").mode == "min"
    with pytest.raises(ConfigError, match="cannot tell whether 'val_score'"):
        EarlyStopping("val_score")


def test_two_stoppers_on_different_metrics_keep_their_own_state(tmp_path):
    """Checkpoint state is keyed per instance: neither overwrites the other on resume."""
    from trainkit.loop.callbacks import callback_keys

    by_loss, by_accuracy = EarlyStopping("val_loss", patience=3), EarlyStopping("val_accuracy", patience=3)
    run_epochs(by_loss, [1.0, 0.5, 0.7])
    run_epochs(by_accuracy, [1.0, 0.9, 0.8])  # accuracies 0.0, 0.1, 0.2: improving
    keys = callback_keys([by_loss, by_accuracy])
    assert keys == ["EarlyStopping[val_loss]", "EarlyStopping[val_accuracy]"]
    assert callback_keys([by_loss, EarlyStopping("val_loss")]) == ["EarlyStopping[val_loss]", "EarlyStopping[val_loss]#2"]
    saved = dict(zip(keys, (by_loss.state_dict(), by_accuracy.state_dict())))
    fresh = [EarlyStopping("val_loss", patience=3), EarlyStopping("val_accuracy", patience=3)]
    for key, stopper in zip(callback_keys(fresh), fresh):
        stopper.load_state_dict(saved[key])
    assert (fresh[0].best, fresh[0].wait) == (0.5, 1)
    assert (fresh[1].best, fresh[1].wait) == (pytest.approx(0.2), 0)


def test_start_from_epoch_ignores_early_epochs():
    stopper = EarlyStopping(patience=1, start_from_epoch=2)
    state, _ = run_epochs(stopper, [0.1, 0.2, 0.9, 0.95])
    assert stopper.best_epoch == 3 and state.epoch == 4 and state.stop_requested


def test_unknown_metric_is_a_clear_error():
    stopper = EarlyStopping(monitor="val_f1")
    with pytest.raises(ConfigError, match="val_f1.*available"):
        run_epochs(stopper, [1.0])


def test_state_round_trip():
    stopper = EarlyStopping(patience=3)
    run_epochs(stopper, [1.0, 0.5, 0.7])
    other = EarlyStopping(patience=3)
    other.load_state_dict(stopper.state_dict())
    assert (other.best, other.best_epoch, other.wait) == (0.5, 2, 1)


def test_non_finite_count_survives_a_resume_and_older_checkpoints_load():
    stopper = EarlyStopping(patience=3)
    run_epochs(stopper, [1.0, float("nan")])
    other = EarlyStopping(patience=3)
    other.load_state_dict(stopper.state_dict())
    assert (other.wait, other.nonfinite) == (1, 1)
    older = {key: value for key, value in stopper.state_dict().items() if key != "nonfinite"}
    other.load_state_dict(older)
    assert other.nonfinite == 0


@pytest.mark.parametrize("kwargs", [{"mode": "up"}, {"patience": -1}, {"min_delta": -1}, {"patience": 1.5}])
def test_invalid_arguments(kwargs):
    with pytest.raises(ConfigError):
        EarlyStopping(**kwargs)
