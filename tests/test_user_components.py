"""`trainkit train --model MODULE:FUNCTION --dataset MODULE:FUNCTION`: the user's factories through
the CLI, exact resume after SIGKILL for each new data path, and every factory mistake as one line.

The factories live in a module written into the test's folder (the current directory of each
run): a map-style Dataset whose ``__getitem__`` adds noise from torch's global RNG (random
augmentation), a model with dropout, and a factory returning a torchdata StatefulDataLoader.
"""

from __future__ import annotations

import json
import os
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
    evaluate = subprocess.run([sys.executable, "-m", "trainkit", "evaluate", "run/checkpoints/best.pt"], cwd=workdir,
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
