"""One process per run folder, atomic files, and temp-file clean-up that spares live writers.

The lock cases use real `trainkit train` processes: a run that stops itself with SIGSTOP at an
exact step (``TRAINKIT_KILL_SIGNAL=STOP``) holds its folder while the second process tries.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainkit.checkpoint.store import CheckpointDir
from trainkit.exits import EXIT_USAGE
from trainkit.errors import ConfigError
from trainkit.checkpoint.rundir import (
    RunFolderBusy, holding_run_folder, lock_run_folder, release_run_folder, remove_stale_temp_files, temp_path,
)  # fmt: skip

RUN = ["--dataset", "synthetic", "--epochs", "3", "--batch-size", "64", "--device", "cpu",
       "--checkpoint-every-steps", "10"]  # fmt: skip


def start(out: Path, *extra: str, stop_at: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINKIT_KILL")}
    if stop_at:
        env.update(TRAINKIT_KILL_AT=stop_at, TRAINKIT_KILL_SIGNAL="STOP")
    return subprocess.Popen([sys.executable, "-m", "trainkit", "train", *RUN, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def wait_until_stopped(process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{process.pid}/stat").read_text().split(")")[-1].split()[0] != "T":
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never reached its stop point"
        time.sleep(0.05)


def test_a_second_run_and_a_resume_are_refused_while_a_run_holds_the_folder_and_a_dead_ones_lock_is_not(tmp_path):
    out = tmp_path / "run"
    first = start(out, stop_at="step:15")  # frozen mid-epoch, holding the lock, after the step-10 checkpoint
    try:
        wait_until_stopped(first)
        for extra in ([], ["--resume"], ["--seed", "1"]):
            second = subprocess.run([sys.executable, "-m", "trainkit", "train", *RUN, "--out", str(out), *extra],
                                    capture_output=True, text=True, timeout=120)  # fmt: skip
            assert second.returncode == EXIT_USAGE, second.stderr
            assert f"is in use by another trainkit process (PID {first.pid})" in second.stderr
            assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
    finally:
        first.kill()  # SIGKILL: the OS drops its lock; the lock file stays behind, stale
        first.wait()
    assert (out / ".lock").read_text().strip() == str(first.pid)
    resumed = subprocess.run([sys.executable, "-m", "trainkit", "train", *RUN, "--out", str(out), "--resume"],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "epoch-0001-step-00000010.pt" in resumed.stderr


def test_two_runs_started_at_once_on_one_folder_never_mix(tmp_path):
    """The review's F9: both processes used to pass the "holds a run?" check while the first was
    still loading data. Freeze the first right there (after the lock, before config.json)."""
    out = tmp_path / "run"
    first = start(out, "--seed", "0", stop_at="start:1")
    try:
        wait_until_stopped(first)
        assert not (out / "config.json").exists()
        second = subprocess.run([sys.executable, "-m", "trainkit", "train", *RUN, "--out", str(out), "--seed", "1"],
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert second.returncode == EXIT_USAGE and f"(PID {first.pid})" in second.stderr, second.stderr
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert json.loads((out / "config.json").read_text())["seed"] == 0
    assert json.loads((out / "summary.json").read_text())["seed"] == 0
    epochs = [line.split(",")[0] for line in (out / "history.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3"]


def test_the_lock_is_reentrant_in_one_process_and_exclusive_between_processes(tmp_path):
    out = tmp_path / "run"
    with holding_run_folder(out):
        with holding_run_folder(out):  # train_run holds it, then Trainer.fit asks again
            pass
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from trainkit.checkpoint.rundir import lock_run_folder;"
             f"lock_run_folder(Path({str(out)!r}))"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert probe.returncode != 0 and f"PID {os.getpid()}" in probe.stderr
    lock_run_folder(out)  # released at the end of the block: free again
    release_run_folder(out)


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_an_out_that_is_not_a_folder_is_one_line(tmp_path, kind):
    (tmp_path / "afile").write_text("hi")
    out = tmp_path / "afile" if kind == "file" else tmp_path / "afile" / "sub"
    with pytest.raises(ConfigError, match=r"--out .*afile.* (is a file|lies under a file)"):
        lock_run_folder(out)


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only tmpfs where mounting is allowed (root in a container), else a chmod-ed folder."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,ro", "tmpfs", str(folder)],
                      capture_output=True).returncode == 0:  # fmt: skip
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
    elif os.geteuid() != 0:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
    else:
        pytest.skip("root without mount rights can write into any folder")


def test_an_out_that_cannot_be_written_is_one_line(read_only_folder):
    with pytest.raises(ConfigError, match="choose a writable folder"):
        lock_run_folder(read_only_folder / "run")  # a new folder
    with pytest.raises(ConfigError, match="choose a writable folder"):
        lock_run_folder(read_only_folder)  # an existing one


@pytest.fixture
def pids():
    """(a live process's PID, a dead process's PID)."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    yield sleeper.pid, int(finished.stdout)
    sleeper.send_signal(signal.SIGKILL)
    sleeper.wait()


def test_temp_clean_up_removes_dead_writers_files_only(tmp_path, pids):
    live_pid, dead_pid = pids
    live = tmp_path / f".epoch-0002.pt.trainkit-{live_pid}.tmp"
    dead = tmp_path / f".epoch-0001.pt.trainkit-{dead_pid}.tmp"
    older_live = tmp_path / f".epoch-0003.pt.{live_pid}.tmp"  # an older trainkit's unmarked names
    older_dead = tmp_path / f".history.csv.{dead_pid}.tmp"
    older_no_pid = tmp_path / ".config.json.tmp"
    ours = temp_path(tmp_path / "summary.json")
    for path in (live, dead, older_live, older_dead, older_no_pid, ours):
        path.write_bytes(b"partial")
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead.name, older_dead.name, older_no_pid.name, ours.name])
    assert live.exists() and older_live.exists(), "a temp file whose writer is alive is never removed"
    assert ours.name == f".summary.json.trainkit-{os.getpid()}.tmp"


def users_files(folder: Path, dead_pid: int) -> dict[Path, str]:
    """The review's K1 folder: hidden *.tmp files and a folder of the user's, next to trainkit's names."""
    files = {folder / ".cache.tmp" / "data.txt": "precious", folder / ".draft.tmp": "draft",
             folder / f".session.{dead_pid}.tmp": "x", folder / "notes.txt": "keep",
             folder / f".notes.txt.{dead_pid}.tmp": "not a file trainkit writes",
             folder / f".model.safetensors.trainkit-{dead_pid}.tmp" / "inside": "a folder, outside checkpoints/"}  # fmt: skip
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return files


def test_temp_clean_up_never_touches_the_users_own_tmp_files_or_folders(tmp_path, pids):
    """K1: the clean-up used to remove every hidden *.tmp in --out, rmtree-ing folders."""
    _, dead_pid = pids
    files = users_files(tmp_path, dead_pid)
    assert remove_stale_temp_files(tmp_path) == []
    assert {path: path.read_text() for path in files} == files
    checkpoints = tmp_path / "checkpoints"
    shards = checkpoints / f".epoch-0003.dcp.trainkit-{dead_pid}.tmp"
    shards.mkdir(parents=True)
    (shards / "__0_0.distcp").write_bytes(b"shard")
    (checkpoints / ".cache.tmp").mkdir()
    assert CheckpointDir(checkpoints).remove_temp_files() == [shards]  # a checkpoint folder: temp folders too
    assert not shards.exists() and (checkpoints / ".cache.tmp").is_dir()


def test_a_run_into_a_folder_of_the_users_keeps_the_users_tmp_files(tmp_path, pids):
    """K1, end to end: `trainkit train --out DIR` on a folder of the user's own."""
    from trainkit.config.schema import TrainConfig
    from trainkit.recipes.run import train_run

    _, dead_pid = pids
    files = users_files(tmp_path, dead_pid)
    leftover = tmp_path / f".summary.json.trainkit-{dead_pid}.tmp"
    leftover.write_text("a crashed writer's")
    train_run(TrainConfig(dataset="synthetic", epochs=1, batch_size=64, device="cpu", out=str(tmp_path)))
    assert {path: path.read_text() for path in files} == files
    assert not leftover.exists()
    assert (tmp_path / "summary.json").is_file()


HOLD_SHARED = ("import fcntl, sys, time; handle = open(sys.argv[1], 'rb'); fcntl.flock(handle, fcntl.LOCK_SH);"
               "print('held', flush=True); time.sleep(float(sys.argv[2]))")  # what is_locked does, made longer


def hold_shared_lock(out: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SHARED, str(out / ".lock"), str(seconds)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_lock_attempt_outwaits_a_momentary_holder_and_not_a_lasting_one(tmp_path):
    """F6: a probe's shared lock at the instant of lock_run_folder used to refuse the run."""
    out = tmp_path / "run"
    lock_run_folder(out)
    release_run_folder(out)
    holder = hold_shared_lock(out, 0.3)
    lock_run_folder(out)
    try:
        assert holder.poll() == 0, "the lock was taken only once the holder let go"
        assert (out / ".lock").read_text() == f"{os.getpid()}\n"
    finally:
        release_run_folder(out)
    holder = hold_shared_lock(out, 5)
    started = time.monotonic()
    with pytest.raises(RunFolderBusy, match="is in use by another trainkit process"):
        lock_run_folder(out)
    assert 0.9 < time.monotonic() - started < 4
    holder.kill()
    holder.wait()


POLL = ("import sys; from pathlib import Path; from trainkit.checkpoint.rundir import is_locked\n"
        "out, stop = map(Path, sys.argv[1:]); print('polling', flush=True)\n"
        "while not stop.exists():\n    for _ in range(100): is_locked(out)")  # fmt: skip


def test_polling_is_locked_in_another_process_never_refuses_a_lock(tmp_path):
    """F6 as the review measured it: 11 of 2000 attempts were refused (60-70 of 2000 here)."""
    out, stop = tmp_path / "run", tmp_path / "stop"
    lock_run_folder(out)
    release_run_folder(out)
    poller = subprocess.Popen([sys.executable, "-c", POLL, str(out), str(stop)], stdout=subprocess.PIPE, text=True)
    refused = 0
    try:
        assert poller.stdout.readline().strip() == "polling"
        for _ in range(1000):  # each attempt is a fresh open + flock, like a starting run's
            try:
                lock_run_folder(out)
            except RunFolderBusy:
                refused += 1
                continue
            release_run_folder(out)
    finally:
        stop.touch()
        poller.wait(timeout=60)
    assert refused == 0
