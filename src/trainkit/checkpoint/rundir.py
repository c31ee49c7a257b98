"""The run folder: one process at a time, files written atomically, leftovers cleaned safely.

A run folder (``--out``) is owned by exactly one process for the whole run: an exclusive
``flock`` on ``OUT/.lock``, which the OS releases when the process dies, so a stale lock of a
killed run never blocks ``--resume``. Two ``trainkit train`` on one folder, or a ``--resume``
while the run is still training, would otherwise interleave their history rows and overwrite
each other's checkpoints.

Every file trainkit writes goes to ``.NAME.trainkit-PID.tmp`` first, is fsynced and renamed over
``NAME``, and the folder is fsynced: a crash leaves the old file or the new one. The clean-up at
the start of a run removes only such marked names whose writer is dead (and the unmarked
``.NAME.PID.tmp`` of an older trainkit, for the files a run folder holds): ``--out`` may be a
folder of the user's own, whose hidden ``*.tmp`` files are none of trainkit's business. Temp
folders (sharded checkpoints) are removed only inside a checkpoint folder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainkit.errors import ConfigError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks (documented in docs/reliability.md)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("trainkit")

LOCK_FILE = ".lock"
LOCK_PATIENCE_S = 1.0  # how long a lock attempt outwaits a momentary holder (is_locked's probe)
TEMP_SUFFIX = ".tmp"
TEMP_MARKER = "trainkit"
_TEMP_NAME = re.compile(rf"^\.(?P<name>.+)\.{TEMP_MARKER}-(?P<pid>\d+)\.tmp$")
_UNMARKED_TEMP_NAME = re.compile(r"^\.(?P<name>.+?)(?:\.(?P<pid>\d+))?\.tmp$")  # an older trainkit's
# The files trainkit writes into a run folder and its checkpoints/ (a sharded checkpoint's set-aside
# folder included): only for these is an unmarked temp name trainkit's own.
RUN_FILE_NAME = re.compile(
    r"^(config\.json|history\.csv|summary\.json|failure\.json|trial\.json|lr_find\.(json|png)|[^/]+\.safetensors"
    r"|(epoch-\d+(-step-\d+)?|best)\.(pt|dcp(\.old)?)|\.lock)$"
)
CHECKPOINTS = "checkpoints"
_held: dict[Path, int] = {}  # run folders this process holds: resolved path -> lock fd


# ------------------------------------------------------------------ the lock
class RunFolderBusy(ConfigError):
    """Another live process holds the run folder."""


def lock_run_folder(out_dir: Path) -> None:
    """Take the exclusive lock on ``out_dir`` for the rest of this process (or until released).

    Creates the folder if needed; every way that can fail (a file in the way, a read-only
    filesystem, no permission) is a one-line ConfigError naming the folder.
    """
    key = out_dir.resolve()
    if key in _held:
        return
    make_folder(out_dir)
    try:
        fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write into --out {out_dir}: {exc.strerror}; choose a writable folder") from None
    if fcntl is not None and not _lock_within(fd, LOCK_PATIENCE_S):
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderBusy(
            f"{out_dir} is in use by another trainkit process (PID {holder}); wait for it to finish, "
            f"stop it, or choose another --out"
        )
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd


def _lock_within(fd: int, seconds: float) -> bool:
    """Try the exclusive flock until ``seconds`` pass. ``is_locked`` (runs, report, the tuner's claim)
    holds a shared lock for an instant; a start that lands in that instant must not be refused."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def is_locked(folder: Path) -> bool:
    """Whether a live process holds the run's lock (the OS drops a dead one's). The probe holds a
    shared lock for an instant; ``lock_run_folder`` outwaits it."""
    path = folder / LOCK_FILE
    if fcntl is None or not path.is_file():
        return False
    with path.open("rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


@contextmanager
def waiting_for_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` for the block, waiting for its holder (the OS releases a dead
    holder's): short critical sections shared by several processes, such as claiming a tuning trial."""
    make_folder(path.parent)
    if fcntl is None:
        yield  # not POSIX: no advisory locks (docs/reliability.md)
        return
    with path.open("a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def release_run_folder(out_dir: Path) -> None:
    fd = _held.pop(out_dir.resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


@contextmanager
def holding_run_folder(out_dir: Path) -> Iterator[None]:
    """Hold the lock for the block; a no-op when this process already holds it (train_run does)."""
    if out_dir.resolve() in _held:
        yield
        return
    lock_run_folder(out_dir)
    try:
        yield
    finally:
        release_run_folder(out_dir)


def make_folder(path: Path) -> None:
    """mkdir -p, with the reason in one line when it cannot be done."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"--out {path} is a file, not a folder; choose another --out") from None
    except NotADirectoryError:
        raise ConfigError(f"--out {path} lies under a file, not a folder; choose another --out") from None
    except OSError as exc:
        raise ConfigError(f"cannot create --out {path}: {exc.strerror}; choose a writable folder") from None


# ------------------------------------------------------------- atomic files
def temp_path(path: Path) -> Path:
    """Where ``path`` is written before its rename: unique per process, hidden, same folder."""
    return path.with_name(f".{path.name}.{TEMP_MARKER}-{os.getpid()}{TEMP_SUFFIX}")


def fsync_directory(directory: Path) -> None:
    """Make a rename durable: without this, a power cut can forget the new directory entry."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing_atomically(path: Path) -> Iterator[Path]:
    """Yield the temp path to write ``path``'s new content to; then fsync it, rename it over
    ``path`` and fsync the folder. On any failure the temp file is removed and the old file
    (if any) is untouched."""
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_atomically(path: Path, data: str | bytes) -> None:
    with replacing_atomically(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def remove_stale_temp_files(directory: Path, *, folders: bool = False) -> list[Path]:
    """Delete the temp files that crashed trainkit writers left in ``directory``; anything else there
    may be the user's. ``folders``: also sharded checkpoints' temp folders (for a checkpoint folder
    only: a folder is never deleted from a folder the user chose)."""
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        if not is_stale_temp_name(path.name) or (_is_real_folder(path) and not folders):
            continue
        if _is_real_folder(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        log.info("removed %s, left by an interrupted write", path)
    return removed


def is_stale_temp_name(name: str) -> bool:
    """A temp name of trainkit's whose writer is gone: ``.NAME.trainkit-PID.tmp``, or an older
    trainkit's unmarked ``.NAME.PID.tmp`` / ``.NAME.tmp`` where NAME is a file of a run folder."""
    if match := _TEMP_NAME.match(name):
        pid: int | None = int(match["pid"])
    elif (match := _UNMARKED_TEMP_NAME.match(name)) and RUN_FILE_NAME.match(match["name"]):
        pid = int(match["pid"]) if match["pid"] else None
    else:
        return False
    return pid is None or not _is_other_live_process(pid)


def _is_real_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def run_folder_of(path: Path) -> Path | None:
    """The run folder (one holding config.json) that ``path`` is, or would be, a file of: one of its
    own files by name, or anything in its checkpoints/."""
    path = path.resolve()
    if path.parent.name == CHECKPOINTS and (path.parent.parent / "config.json").is_file():
        return path.parent.parent
    if RUN_FILE_NAME.match(path.name) and (path.parent / "config.json").is_file():
        return path.parent
    return None


def _is_other_live_process(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours: nothing of ours is in flight when clean-up runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    except OverflowError:
        return False
    return True


def read_json(path: Path, what: str) -> Any:
    """A JSON file trainkit wrote; damage or hand edits become one line naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} is damaged ({exc}); restore it from a backup or start a new run") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
