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

from trainkit.cli import EXIT_USAGE
from trainkit.errors import ConfigError
from trainkit.rundir import holding_run_folder, lock_run_folder, release_run_folder, remove_stale_temp_files

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
            [sys.executable, "-c", "import sys; from pathlib import Path; from trainkit.rundir import lock_run_folder;"
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


def test_temp_clean_up_removes_dead_writers_files_only(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    try:
        live = tmp_path / f".epoch-0002.pt.{sleeper.pid}.tmp"
        dead = tmp_path / f".epoch-0001.pt.{dead_pid}.tmp"
        old_style = tmp_path / ".config.json.tmp"
        ours = tmp_path / f".summary.json.{os.getpid()}.tmp"
        for path in (live, dead, old_style, ours):
            path.write_bytes(b"partial")
        removed = remove_stale_temp_files(tmp_path)
        assert sorted(p.name for p in removed) == sorted([dead.name, old_style.name, ours.name])
        assert live.exists(), "a temp file whose writer is alive is never removed"
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
