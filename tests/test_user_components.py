"""`trainkit train --model MODULE:FUNCTION --dataset MODULE:FUNCTION`: the user's factories through
the CLI, exact resume after SIGKILL for each new data path, and every factory mistake as one line.

The factories live in a module written into the test's folder (the current directory of each
run): a map-style Dataset whose ``__getitem__`` adds noise from torch's global RNG (random
augmentation), a model with dropout, and a factory returning a torchdata StatefulDataLoader.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_distributed import free_port

FACTORIES = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import Dataset


    class Noisy(Dataset):
        """Two Gaussian blobs; each sample gets fresh noise from torch's RNG (augmentation)."""

        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.y = torch.randint(0, 2, (n,), generator=g)
            self.x = torch.randn(n, 8, generator=g) + self.y[:, None] * 1.5

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i] + 0.3 * torch.randn(8), self.y[i]


    def make_data(n=240):
        return Noisy(n, 0), Noisy(60, 1), Noisy(60, 2)


    def make_stateful(n=240):
        from torchdata.stateful_dataloader import StatefulDataLoader
        return StatefulDataLoader(Noisy(n, 0), batch_size=16, shuffle=True), Noisy(60, 1)


    def make_model(width=32):
        return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, 2))


    def not_a_model():
        return "a string"


    def one_dataset():
        return Noisy(10, 0)


    def unlabelled():
        return [torch.randn(8) for _ in range(32)], None
''')
RUN = ["--epochs", "2", "--batch-size", "16", "--lr", "0.01", "--device", "cpu", "--patience", "0", "--checkpoint-every-steps", "4"]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "userparts.py").write_text(FACTORIES)
    return tmp_path


def trainkit(cwd: Path, *args: str, kill_at: str | None = None, torchrun: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINKIT_KILL") and k not in ("RANK", "WORLD_SIZE")}
    env.update(TRAINKIT_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [env.get("PYTHONPATH")])))
    if kill_at:
        env.update(TRAINKIT_KILL_AT=kill_at, **({"TRAINKIT_KILL_RANK": "1"} if torchrun else {}))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port",
                str(free_port())] if torchrun else [sys.executable]  # fmt: skip
    command = [*launcher, "-m", "trainkit", "train", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False)


def sha(out: Path) -> str:
    return json.loads((out / "summary.json").read_text())["model_sha256"]


def killed_then_resumed(cwd: Path, out: str, args: list[str], kill_at: str, torchrun: bool = False) -> str:
    killed = trainkit(cwd, *args, "--out", out, kill_at=kill_at, torchrun=torchrun)
    assert killed.returncode != 0 and not (cwd / out / "summary.json").exists(), killed.stderr[-2000:]
    resumed = trainkit(cwd, *args, "--out", out, "--resume", torchrun=torchrun)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return sha(cwd / out)


USER = ["--model", "userparts:make_model", "--dataset", "userparts:make_data", *RUN]


def test_dataset_with_augmentation_and_two_workers_resumes_bit_exactly_after_sigkill(workdir):
    args = [*USER, "--num-workers", "2"]
    full = trainkit(workdir, *args, "--out", "full")
    assert full.returncode == 0, full.stderr[-2000:]
    summary = json.loads((workdir / "full" / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.7 and summary["optimizer_steps"] == 30
    assert killed_then_resumed(workdir, "crash", args, kill_at="step:7") == summary["model_sha256"]
    # the killed run resumed mid-epoch 1 from the step-4 checkpoint: a real mid-epoch resume
    assert (workdir / "crash" / "checkpoints").is_dir()


def test_stateful_dataloader_resumes_bit_exactly_after_sigkill(workdir):
    args = ["--model", "userparts:make_model", "--dataset", "userparts:make_stateful", *RUN]
    full = trainkit(workdir, *args, "--out", "full")
    assert full.returncode == 0, full.stderr[-2000:]
    assert "no test set" in full.stderr
    assert killed_then_resumed(workdir, "crash", args, kill_at="step:6") == sha(workdir / "full")


def test_ddp_on_gloo_with_a_user_dataset_resumes_bit_exactly_after_sigkill(workdir):
    args = [*USER, "--strategy", "ddp"]
    full = trainkit(workdir, *args, "--out", "full", torchrun=True)
    assert full.returncode == 0, full.stderr[-2000:]
    assert killed_then_resumed(workdir, "crash", args, kill_at="step:6", torchrun=True) == sha(workdir / "full")


def test_evaluate_rebuilds_the_user_model_from_the_recorded_factory(workdir):
    assert trainkit(workdir, *USER, "--model-arg", "width=8", "--out", "run").returncode == 0
    summary = json.loads((workdir / "run" / "summary.json").read_text())
    config = json.loads((workdir / "run" / "config.json").read_text())
    assert config["model_args"] == {"width": 8}
    evaluate = subprocess.run([sys.executable, "-m", "trainkit", "evaluate", "run/checkpoints/best.pt", *USER[:4]], cwd=workdir,
                              capture_output=True, text=True, env={**os.environ, "TRAINKIT_OFFLINE": "1"}, check=False)  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr
    best = json.loads((workdir / "run" / "summary.json").read_text())["best_epoch"]
    assert f"(epoch {best})" in evaluate.stdout and "accuracy" in evaluate.stdout
    assert summary["test_accuracy"] >= 0.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nomodule:make"], "--model nomodule:make: no module 'nomodule' in the current directory"),
        (["--model", "userparts:missing"], "--model userparts:missing: module userparts has no 'missing'"),
        (["--model", "userparts:not_a_model"], "--model userparts:not_a_model returned str; a model factory must return"),
        (["--dataset", "userparts:one_dataset"], "--dataset userparts:one_dataset returned Noisy; a dataset factory must return"),
        (["--model-arg", "depth=3"], "--model userparts:make_model does not take these arguments"),
        (["--model-arg", "3"], "--model-arg expects key=value"),
        (["--dataset", "userparts:unlabelled"], "--dataset userparts:unlabelled: its samples are Tensor"),
        (["--dataset", "userparts:make_stateful", "--batch-size", "auto"], "--batch-size auto needs a map-style Dataset"),
        (["--model", "mlp"], "--model mlp is sized for trainkit's image datasets"),
    ],
)
def test_factory_mistakes_are_one_line_errors_naming_the_factory(workdir, args, message):
    base = {"--model": "userparts:make_model", "--dataset": "userparts:make_data"}
    for flag, value in zip(args[::2], args[1::2]):
        if flag in base:
            base[flag] = value
    extra = [a for flag, value in zip(args[::2], args[1::2]) if flag not in base for a in (flag, value)]
    result = trainkit(workdir, *[a for pair in base.items() for a in pair], *RUN, *extra, "--out", "run")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("trainkit train")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr  # (a library's own warning, e.g. torchdata's, may precede it)
    assert not (workdir / "run" / "config.json").exists()


def test_batch_size_auto_probes_a_user_dataset_with_the_runs_task(workdir):
    """Real CPU steps on the dataset's first samples, extrapolated within --memory-budget."""
    result = trainkit(workdir, *USER, "--batch-size", "auto", "--memory-budget", "0.5", "--epochs", "1", "--out", "run")
    assert result.returncode == 0, result.stderr[-2000:]
    chosen = json.loads((workdir / "run" / "config.json").read_text())["batch_size"]
    assert chosen == 128, result.stderr  # the cap: 240 samples -> the largest power of two below it
    assert "--batch-size auto: 128" in result.stderr


def test_lr_auto_plots_and_inspect_work_for_user_components(workdir):
    result = trainkit(workdir, *USER, "--lr", "auto", "--epochs", "1", "--out", "run")
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads((workdir / "run" / "lr_find.json").read_text())
    assert json.loads((workdir / "run" / "summary.json").read_text())["lr"] == found["suggested_lr"] > 0
    assert {"loss.png", "accuracy.png", "lr.png", "lr_find.png"} <= {p.name for p in (workdir / "run").iterdir()}
    inspect = subprocess.run([sys.executable, "-m", "trainkit", "inspect", "run/checkpoints/best.pt"], cwd=workdir,
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert inspect.returncode == 0 and '"model": "userparts:make_model"' in inspect.stdout, inspect.stdout


# ------------------------------------------- data mistakes in a user's dataset (W-1, W-2, G20)
# Run in process through trainkit.cli.main; each factory changes one thing of ``good``.
BAD_DATA = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import Dataset, TensorDataset

    D, C = 8, 4

    def _xy(n=256, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, D, generator=g)
        return x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()

    class Rows(Dataset):
        def __init__(self, x, y, n=None):
            self.x, self.y, self.n = x, y, n
        def __len__(self):
            return self.n or len(self.x)
        def __getitem__(self, i):
            return self.x[i], self.y[i]

    class Ragged(Rows):
        def __getitem__(self, i):
            return (torch.randn(9) if i == 5 else self.x[i]), self.y[i]

    class Named(Rows):
        def __getitem__(self, i):
            return self.x[i], "abcd"[int(self.y[i])]

    class NanFirstValidation(Rows):
        """NaN in one feature on the first validation pass only (reads in evaluation run in inference mode)."""
        passes = 0
        def __getitem__(self, i):
            x = self.x[i].clone()
            if torch.is_inference_mode_enabled() and i == 3:
                NanFirstValidation.passes += 1
                if NanFirstValidation.passes == 1:
                    x[2] = float("nan")
            return x, self.y[i]

    def model(width: int = 16):
        return nn.Sequential(nn.Linear(D, width), nn.ReLU(), nn.Linear(width, C))

    def double_model():
        return model().double()

    def val():
        return TensorDataset(*_xy(64, 1))

    def with_label(row, value):
        x, y = _xy()
        y[row] = value
        return x, y

    def label_too_big():
        return Rows(*with_label(100, 4)), val()

    def label_negative():
        return TensorDataset(*with_label(100, -1)), val()

    def val_label_too_big():
        x, y = _xy(64, 1)
        y[10] = 7
        return TensorDataset(*_xy()), Rows(x, y)

    def val_label_negative():
        x, y = _xy(64, 1)
        y[10] = -3
        return TensorDataset(*_xy()), TensorDataset(x, y)

    def ragged():
        return Ragged(*_xy()), val()

    def float_labels():
        x, y = _xy()
        return TensorDataset(x, y.float()), val()

    def str_labels():
        return Named(*_xy()), val()

    def float64_features():
        x, y = _xy()
        return TensorDataset(x.double(), y), TensorDataset(*(t.double() if t.is_floating_point() else t for t in _xy(64, 1)))

    def label_ignore():
        x, y = _xy()
        return TensorDataset(x, torch.full_like(y, -100)), val()

    def lying():
        return Rows(*_xy(), n=300), val()

    def same():
        data = TensorDataset(*_xy())
        return data, data

    def nan_val():
        x, y = _xy(64, 1)
        x[3, 2] = float("nan")
        return TensorDataset(*_xy()), TensorDataset(x, y)

    def nan_second_val():
        return TensorDataset(*_xy()), NanFirstValidation(*_xy(64, 1))
''')
BASE = ["--model", "baddata:model", "--epochs", "2", "--batch-size", "32", "--device", "cpu", "--threads", "1"]


@pytest.fixture
def bad_data(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "baddata.py").write_text(BAD_DATA)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "baddata", raising=False)
    monkeypatch.setenv("TRAINKIT_OFFLINE", "1")
    return tmp_path


def train_in_process(capsys, caplog, *args: str) -> tuple[int, list[str], str]:
    """(exit code, the error lines, stderr and the log) of `trainkit train` run through cli.main."""
    from trainkit.cli import main

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainkit"):
        code = main(["train", *BASE, *args])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("trainkit train")], err + caplog.text


def strict_json(path: Path) -> dict:
    """json.loads refusing NaN and Infinity, as RFC 8259 (and JavaScript's JSON.parse) do."""
    def refuse(constant: str):
        raise ValueError(f"{path.name} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize(
    "factory, message",
    [
        ("label_negative", "--dataset baddata:label_negative: training samples 0-255: sample 100 has label -1: class "
                           "labels are indices from 0 to the number of classes minus 1, or the ignore index -100"),
        ("val_label_negative", "--dataset baddata:val_label_negative: validation samples 0-63: sample 10 has label -3"),
        ("float_labels", "--dataset baddata:float_labels: training samples 0-255: sample 0 has label 0 (float32): "
                         "classification needs integer class indices: return torch.long labels"),
        ("str_labels", "--dataset baddata:str_labels: training samples 0-63 and 255: sample 0 has label 'a' (str): "
                       "classification needs integer class indices: map the labels to numbers"),
        ("ragged", "--dataset baddata:ragged: training sample 5 is tuple(Tensor[9], Tensor[]) but sample 0 is "
                   "tuple(Tensor[8], Tensor[]): every sample needs the same structure and shapes"),
        ("lying", "--dataset baddata:lying: training sample 299 cannot be read (index 299 is out of bounds for dimension 0 "
                  "with size 256) although its __len__ says 300: make __len__ return the number of samples"),
        ("label_ignore", "--dataset baddata:label_ignore: training samples 0-255: no target in these samples: every label "
                         "is the ignore index -100 (padding), so the loss is NaN; give it real labels or leave such "
                         "batches out (a lower lr would not help)"),
    ],
)
def test_data_a_task_cannot_train_on_is_one_line_before_config_json(bad_data, capsys, caplog, factory, message):
    """G9, G11, G12, G15, G16, G17: checked on the first samples (whole tensors in memory), before any step."""
    code, errors, err = train_in_process(capsys, caplog, "--dataset", f"baddata:{factory}", "--out", "run")
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"trainkit train: error: {message}"), err[-2000:]
    assert "Traceback" not in err and not (bad_data / "run" / "config.json").exists()


@pytest.mark.parametrize(
    "factory, where, label",
    [
        ("label_too_big", r"the training batch of optimizer step \d+ \(epoch 1\)", 4),
        ("val_label_too_big", r"validation after epoch 1", 7),
    ],
)
def test_a_label_beyond_the_models_classes_is_one_line_naming_where_and_the_value(bad_data, capsys, caplog, factory, where, label):
    """G8, G10: the class count is the model's, known at the loss: the step (or validation) says it."""
    code, errors, err = train_in_process(capsys, caplog, "--dataset", f"baddata:{factory}", "--out", "run")
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert re.fullmatch(rf"trainkit train: error: --dataset baddata:{factory}: {where}: row \d+ of the batch has label "
                        rf"{label}, but the model has 4 outputs \(classes 0-3\): fix the labels, or give the model "
                        rf"{label + 1} outputs", errors[0]), errors[0]  # fmt: skip


def test_float64_features_are_refused_for_a_float32_model_and_train_a_float64_one(bad_data, capsys, caplog):
    """G18: refused (not cast) in one line; a model the user built in float64 takes them."""
    code, errors, err = train_in_process(capsys, caplog, "--dataset", "baddata:float64_features", "--out", "run")
    assert code == 2 and errors == [
        "trainkit train: error: --dataset baddata:float64_features: training samples 0-255: its features are float64 "
        "but the model's parameters are float32: return float32 tensors (x.float()), or build the model in float64 "
        "(model.double())"], err[-2000:]  # fmt: skip
    code, errors, err = train_in_process(capsys, caplog, "--dataset", "baddata:float64_features", "--model", "baddata:double_model",
                                         "--out", "double")  # fmt: skip
    assert code == 0 and not errors, err[-2000:]


def test_the_same_dataset_for_training_and_validation_is_a_warning(bad_data, capsys, caplog):
    """G20: the data fingerprints' train and val parts were equal, silently."""
    code, _, err = train_in_process(capsys, caplog, "--dataset", "baddata:same", "--epochs", "1", "--out", "run")
    assert code == 0
    assert "--dataset baddata:same returned the same data for training and validation" in err
    code, _, err = train_in_process(capsys, caplog, "--dataset", "baddata:label_too_big", "--epochs", "1", "--out", "other")
    assert "the same data for training and validation" not in err


def test_nan_validation_warns_each_epoch_keeps_the_plateau_lr_and_writes_strict_json(bad_data, capsys, caplog):
    """G19, J2: NaN val_loss every epoch: one warning per validation, the plateau schedule not fed NaN,
    no best epoch, and summary.json without NaN/Infinity."""
    code, errors, err = train_in_process(capsys, caplog, "--dataset", "baddata:nan_val", "--epochs", "3", "--patience", "0",
                                         "--schedule", "plateau", "--plateau-patience", "0", "--out", "run")  # fmt: skip
    assert code == 0 and not errors, err[-2000:]
    warnings = [line for line in err.splitlines() if "gave val_loss nan" in line]
    assert [w[w.index("validation after"):].split(":")[0] for w in warnings] == [
        f"validation after epoch {epoch} gave val_loss nan" for epoch in (1, 2, 3)]
    assert "the plateau schedule skips it" in warnings[0]
    header, *lines = (bad_data / "run" / "history.csv").read_text().splitlines()
    lrs = [float(dict(zip(header.split(","), line.split(",")))["lr"]) for line in lines]
    assert lrs == [1e-3, 1e-3, 1e-3]  # ReduceLROnPlateau cut it to 1e-4, 1e-5, 1e-6
    summary = strict_json(bad_data / "run" / "summary.json")
    assert (summary["best_epoch"], summary["best_val_metric"], summary["best_checkpoint"]) == (None, None, None)


def test_early_stopping_never_reports_an_unvalidated_best_epoch(bad_data, capsys, caplog):
    """J3: validation NaN on its first pass, --patience 1: was "best inf at epoch 1", best_epoch 1 and
    best_val_metric Infinity (not JSON) in summary.json."""
    code, errors, err = train_in_process(capsys, caplog, "--dataset", "baddata:nan_second_val", "--patience", "1", "--epochs", "3",
                                         "--out", "run")  # fmt: skip
    assert code == 0 and not errors, err[-2000:]
    assert ("early stopping: val_loss has not improved for 1 validations, 1 of them non-finite (no validation gave a "
            "finite val_loss)") in err
    summary = strict_json(bad_data / "run" / "summary.json")
    assert (summary["best_epoch"], summary["best_val_metric"]) == (None, None)
    assert summary["final_weights"] == "the weights at the last epoch" and summary["epochs_run"] == 1


def test_check_samples_given_the_model_refuses_float64_features_before_config_json():
    """What `_train_run` gets by passing its model: G18 refused with the other checks, before config.json."""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from trainkit.recipes.components import build_run_task, check_samples
    from trainkit.config.schema import TrainConfig
    from trainkit.errors import DataError
    from trainkit.recipes.factories import UserData

    x, y = torch.randn(40, 8, dtype=torch.float64), torch.randint(0, 4, (40,))
    data = UserData("m:f", TensorDataset(x, y), TensorDataset(x[:8].float(), y[:8]))
    task = build_run_task(TrainConfig())
    with pytest.raises(DataError, match=r"^--dataset m:f: training samples 0-39: its features are float64 but the "
                                         r"model's parameters are float32"):  # fmt: skip
        check_samples(task, data, nn.Linear(8, 4))
    check_samples(task, data)  # without the model the features are not compared
    with pytest.raises(DataError, match=r"^--dataset m:f: validation samples 0-7: its features are float32 but the"):
        check_samples(task, data, nn.Linear(8, 4).double())
