"""Crash safety end to end: real `trainkit train` subprocesses killed at chosen moments.

Each kill uses ``TRAINKIT_KILL_AT`` (see trainkit.faults): the process sends itself SIGKILL
(uncatchable, like a preempted machine) at an exact point, so the tests are deterministic.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainkit.checkpoint.store import CHECKPOINT_NAME, verify_checkpoint
from trainkit.checkpoint.signals import EXIT_INTERRUPTED

# synthetic: 3200 training images / batch 64 = 50 optimizer steps per epoch, 3 epochs. The
# thread count is pinned: CPU kernels split their sums by it, so runs that got different thread
# pools (a CI machine's core count seen differently by two processes) would differ in the last bit.
RUN = ["--dataset", "synthetic", "--epochs", "3", "--batch-size", "64", "--device", "cpu",
       "--dropout", "0.3", "--augment", "1", "--checkpoint-every-steps", "20",
       "--threads", str(min(2, os.cpu_count() or 1))]  # fmt: skip


def trainkit(out: Path, *extra: str, kill_at: str | None = None, signal_name: str = "KILL"):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINKIT_KILL")}
    if kill_at:
        env.update(TRAINKIT_KILL_AT=kill_at, TRAINKIT_KILL_SIGNAL=signal_name)
    return subprocess.run(
        [sys.executable, "-m", "trainkit", "train", *RUN, "--out", str(out), *extra],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def history_values(out: Path) -> list[list[str]]:
    lines = (out / "history.csv").read_text().splitlines()
    header = lines[0].split(",")
    timing = {header.index("epoch_seconds"), header.index("samples_per_second")}
    return [[v for i, v in enumerate(line.split(",")) if i not in timing] for line in lines]


def final_name_files(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    return [p for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name) or p.name == "best.pt"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    result = trainkit(out)
    assert result.returncode == 0, result.stderr
    return out


KILL_POINTS = [
    "step:70",  # mid-epoch 2, ten steps after the step-60 checkpoint
    "validation:2",  # during the second epoch's validation
    "save:temp_written:4",  # mid-save: temp file written, not yet verified/renamed
    "save:before_rename:5",
    "save:after_rename:3",
    "save:retention:1",  # while deleting an old checkpoint
]


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(kill_at, uninterrupted, tmp_path):
    out = tmp_path / "run"
    killed = trainkit(out, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "summary.json").exists()
    for path in final_name_files(out):
        assert verify_checkpoint(path) is None, f"{path.name} under a final name fails verification"

    resumed = trainkit(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert summary(out)["model_sha256"] == summary(uninterrupted)["model_sha256"]
    assert history_values(out) == history_values(uninterrupted)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")], "temp files cleaned up"


@pytest.mark.parametrize(
    ("averaging", "kill_at"),
    [(("--ema", "0.99"), "step:70"), (("--swa-start", "2", "--swa-lr", "0.0005", "--patience", "0"), "step:130")],
    ids=["ema", "swa"],
)
def test_a_weight_averaged_run_killed_mid_epoch_resumes_exactly(averaging, kill_at, tmp_path):
    """The average (and SWA's lr schedule) is in every checkpoint: after SIGKILL the resumed run
    ends with the same weights and history as an uninterrupted one."""
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert trainkit(whole, *averaging).returncode == 0
    assert trainkit(out, *averaging, kill_at=kill_at).returncode == -signal.SIGKILL
    resumed = trainkit(out, *averaging, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert summary(out)["model_sha256"] == summary(whole)["model_sha256"]
    assert summary(out)["test_accuracy"] == summary(whole)["test_accuracy"]
    assert history_values(out) == history_values(whole)


def test_sigterm_saves_exits_with_the_documented_code_and_resumes_exactly(uninterrupted, tmp_path):
    out = tmp_path / "run"
    stopped = trainkit(out, kill_at="step:75", signal_name="TERM")
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stderr
    assert "received SIGTERM" in stopped.stderr and "--resume" in stopped.stderr
    assert (out / "checkpoints" / "epoch-0002-step-00000075.pt").is_file()
    resumed = trainkit(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert summary(out)["model_sha256"] == summary(uninterrupted)["model_sha256"]


@pytest.mark.parametrize("damage", ["truncate-one-byte", "flip-one-byte", "empty"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(damage, uninterrupted, tmp_path):
    out = tmp_path / "run"
    assert trainkit(out, kill_at="step:70").returncode == -signal.SIGKILL
    newest = out / "checkpoints" / "epoch-0002-step-00000060.pt"
    data = newest.read_bytes()
    newest.write_bytes(
        {"truncate-one-byte": data[:-1], "flip-one-byte": data[:500] + bytes([data[500] ^ 0x10]) + data[501:],
         "empty": b""}[damage]  # fmt: skip
    )
    resumed = trainkit(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping epoch-0002-step-00000060.pt" in resumed.stderr
    assert "resuming from" in resumed.stderr and "checkpoints/epoch-0001.pt" in resumed.stderr
    assert summary(out)["model_sha256"] == summary(uninterrupted)["model_sha256"]


# ------------------------------------------------------------------ signals, everywhere
@pytest.mark.parametrize(("point", "resumable"), [("launch:1", False), ("start:1", False)])
def test_sigterm_before_training_is_a_clean_stop_with_status_75(point, resumable, tmp_path):
    out = tmp_path / "run"
    stopped = trainkit(out, kill_at=point, signal_name="TERM")
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stderr
    assert "received SIGTERM outside the training loop" in stopped.stderr
    assert "run the same command again" in stopped.stderr and "Traceback" not in stopped.stderr
    assert not (out / "config.json").exists()


@pytest.mark.parametrize(
    "kill_at",
    [
        "validation:4",  # during the test evaluation, after the last epoch's checkpoint
        "export:1",  # while writing model.safetensors / summary.json
        "step:70,save:temp_written:6",  # a second SIGTERM while the interrupt's checkpoint is being written
    ],
)
def test_sigterm_after_or_during_a_stop_exits_75_and_resumes_exactly(kill_at, uninterrupted, tmp_path):
    out = tmp_path / "run"
    stopped = trainkit(out, kill_at=kill_at, signal_name="TERM")
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1].endswith("continue with --resume")
    if "," in kill_at:
        assert "received SIGTERM again: already stopping, ignored" in stopped.stderr
        assert verify_checkpoint(out / "checkpoints" / "epoch-0002-step-00000070.pt") is None
    resumed = trainkit(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert summary(out)["model_sha256"] == summary(uninterrupted)["model_sha256"]
    assert history_values(out) == history_values(uninterrupted)


# ------------------------------------------------------------------ one restart command, every state
def folder_state(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(out.rglob("*"))}


def test_the_same_resume_command_is_right_in_every_state_of_the_folder(uninterrupted, tmp_path):
    """The restart contract (docs/reliability.md): a scheduler re-runs `trainkit train ... --out DIR --resume`."""
    reference = summary(uninterrupted)["model_sha256"]
    fresh = tmp_path / "nothing-yet"  # nothing there: the run starts, saying so
    started = trainkit(fresh, "--resume")
    assert started.returncode == 0, started.stderr
    assert "holds no run yet; starting it" in started.stderr and summary(fresh)["model_sha256"] == reference
    before = folder_state(fresh)  # finished: exit 0, nothing changes
    again = trainkit(fresh, "--resume")
    assert again.returncode == 0 and "already finished (summary.json); nothing to do" in again.stderr, again.stderr
    assert folder_state(fresh) == before and json.loads(again.stdout) == summary(fresh)

    leftovers = tmp_path / "killed-in-start-up"  # the lock taken, no config.json yet
    assert trainkit(leftovers, kill_at="start:1").returncode == -signal.SIGKILL
    assert not (leftovers / "config.json").exists()
    restarted = trainkit(leftovers, "--resume")
    assert restarted.returncode == 0 and "starting it" in restarted.stderr, restarted.stderr
    assert summary(leftovers)["model_sha256"] == reference

    hung_up = tmp_path / "hung-up"  # SIGHUP (the terminal closed) saves and exits 75, like SIGTERM
    stopped = trainkit(hung_up, kill_at="step:75", signal_name="HUP")
    assert stopped.returncode == EXIT_INTERRUPTED and "received SIGHUP" in stopped.stderr, stopped.stderr
    assert (hung_up / "checkpoints" / "epoch-0002-step-00000075.pt").is_file()
    (hung_up / "config.json").unlink()  # lost by hand: the checkpoints hold the settings the flags are checked against
    resumed = trainkit(hung_up, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert summary(hung_up)["model_sha256"] == reference and (hung_up / "config.json").is_file()
