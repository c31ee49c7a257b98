"""TensorBoard and MLflow logs, read back with each tool's own reader, equal history.csv — also
after a SIGKILL and --resume (one logged run, every step once)."""

from __future__ import annotations

import csv
import importlib.util
import json
import signal
from pathlib import Path

import pytest
from test_reliability import trainkit

from trainkit.errors import ConfigError
from trainkit.tracking.loggers import check_loggers
from trainkit.recipes.run import train_run

needs_backends = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("tensorboard", "mlflow")),
    reason="the logging extra is not installed: pip install -e '.[logging]' (CI installs it)",
)
LOGGED = ["--logger", "csv,tensorboard,mlflow", "--log-every-steps", "5"]
TIMING = ("seconds", "samples_per_second")  # differ between two runs of the same training


def untimed(logged: dict[str, list]) -> dict[str, list]:
    return {key: points for key, points in logged.items() if not key.endswith(TIMING)}


def tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_metrics(out: Path) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    logged = json.loads((out / "summary.json").read_text())["logs"]["mlflow"]
    client = MlflowClient(tracking_uri=logged["uri"])
    keys = client.get_run(logged["run_id"]).data.metrics
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(logged["run_id"], key)) for key in keys}


def history_column(out: Path, column: str) -> list[float]:
    return [float(row[column]) for row in csv.DictReader((out / "history.csv").open())]


def test_an_unknown_logger_or_a_missing_package_is_one_line(monkeypatch):
    with pytest.raises(ConfigError, match="'wandb' is not one of csv, tensorboard, mlflow"):
        check_loggers(["csv", "wandb"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"--logger mlflow needs the mlflow package: pip install 'trainkit\[logging\]'"):
        check_loggers(["mlflow"])
    assert check_loggers(["csv"]) == []


@needs_backends
def test_both_backends_hold_the_history_and_every_fifth_step(synthetic_config, tmp_path):
    train_run(synthetic_config(epochs=3, logger=["csv", "tensorboard", "mlflow"], log_every_steps=5))
    out = tmp_path / "run"
    val_loss = history_column(out, "val_loss")
    for logged in (tensorboard_scalars(out), mlflow_metrics(out)):
        assert [value for _, value in logged["epoch/val_loss"]] == pytest.approx(val_loss, rel=1e-6)  # TB: float32
        steps = [step for step, _ in logged["step/loss"]]
        assert steps == list(range(5, steps[-1] + 1, 5)) and len(steps) >= 3
        assert [step for step, _ in logged["step/lr"]] == steps
    board, store = tensorboard_scalars(out)["step/loss"], mlflow_metrics(out)["step/loss"]
    assert [step for step, _ in board] == [step for step, _ in store]
    assert [value for _, value in board] == pytest.approx([value for _, value in store], rel=1e-6)


@needs_backends
def test_the_end_of_a_run_logs_settings_final_numbers_weights_and_plots(synthetic_config, tmp_path):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = train_run(synthetic_config(epochs=2, lr=3e-3, logger=["tensorboard", "mlflow"]))
    out = tmp_path / "run"
    client = MlflowClient(tracking_uri=summary["logs"]["mlflow"]["uri"])
    run = client.get_run(summary["logs"]["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.003"
    assert run.data.metrics["final/test_accuracy"] == summary["test_accuracy"]
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"model.safetensors", "summary.json", "loss.png", "accuracy.png", "lr.png"} <= artifacts
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"plots/loss", "plots/accuracy", "plots/lr"} <= set(events.Tags()["images"])


@needs_backends
@pytest.mark.parametrize("kill_at", ["step:70", "save:temp_written:7"], ids=["mid-epoch", "after-epoch-write"])
def test_a_killed_and_resumed_run_logs_every_step_once_with_the_uninterrupted_values(kill_at, tmp_path):
    """step:70 is ten steps after the step-60 checkpoint (steps 51-60 were kept, not yet written);
    save 7 (20, 40, epoch 1, its best.pt, 60, 80, epoch 2) is epoch 2's end, after its rows up to
    step 100 were written: the run resumes from step 80 and trains 81-100 again."""
    whole, out = tmp_path / "whole" / "run", tmp_path / "killed" / "run"
    assert trainkit(whole, *LOGGED).returncode == 0
    assert trainkit(out, *LOGGED, kill_at=kill_at).returncode == -signal.SIGKILL
    resumed = trainkit(out, *LOGGED, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert untimed(tensorboard_scalars(out)) == untimed(tensorboard_scalars(whole))
    assert untimed(mlflow_metrics(out)) == untimed(mlflow_metrics(whole))
    steps = [step for step, _ in mlflow_metrics(out)["step/loss"]]
    assert steps == sorted(set(steps))  # strictly increasing: no step twice


@needs_backends
def test_a_tracking_store_that_cannot_be_opened_is_one_line_naming_it(synthetic_config):
    with pytest.raises(ConfigError, match=r"--logger mlflow could not open the tracking store foo://bar: .*--mlflow-uri"):
        train_run(synthetic_config(epochs=1, logger=["mlflow"], mlflow_uri="foo://bar"))
