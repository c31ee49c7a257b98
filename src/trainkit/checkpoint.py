"""Checkpoints that survive crashes: atomic, self-verifying, safely loaded.

File format: the bytes of ``torch.save(payload)`` followed by an 81-byte trailer
``TRAINKIT-SHA256:<64 hex digits>\\n`` holding the sha256 of those bytes. One file, one
rename: there is no moment at which a checkpoint and its digest disagree, and plain
``torch.load`` still reads the file (it ignores trailing bytes). A truncated, bit-flipped
or edited file fails verification before anything is unpickled.

Writes go to a temporary file in the same directory, are flushed and fsynced, re-read and
verified, renamed over the final name, and the directory is fsynced: a crash at any moment
leaves either the old file or the new one, never a partial file under a final name.

Payloads are plain dicts of tensors, numbers, strings, lists and dicts, so they load with
``torch.load(weights_only=True)``; a file that needs anything else is refused.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainkit.errors import CheckpointError
from trainkit.faults import crash_point

log = logging.getLogger("trainkit")

TRAILER_MAGIC = b"TRAINKIT-SHA256:"
TRAILER_SIZE = len(TRAILER_MAGIC) + 64 + 1
CHECKPOINT_NAME = re.compile(r"^epoch-(\d+)(?:-step-(\d+))?\.pt$")
BEST_FILE = "best.pt"
TEMP_SUFFIX = ".tmp"


def model_sha256(model_or_state: nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 over the state_dict's tensors (keys sorted, raw bytes): equal iff weights are equal."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    """True when no floating-point tensor holds NaN or inf."""
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


# ------------------------------------------------------------------------ one file
def encode(payload: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    return body + TRAILER_MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n"


def verified_body(path: Path, data: bytes) -> bytes:
    """The torch.save bytes of a checkpoint file, after checking its sha256 trailer."""
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty")
    trailer = data[-TRAILER_SIZE:]
    if len(data) <= TRAILER_SIZE or not trailer.startswith(TRAILER_MAGIC) or not trailer.endswith(b"\n"):
        raise CheckpointError(f"checkpoint {path} has no integrity trailer: truncated, or not written by trainkit")
    body, expected = data[:-TRAILER_SIZE], trailer[len(TRAILER_MAGIC) : -1].decode("ascii", "replace")
    if hashlib.sha256(body).hexdigest() != expected:
        raise CheckpointError(f"checkpoint {path} fails its sha256 check: corrupted or edited")
    return body


def verify_checkpoint(path: str | Path) -> str | None:
    """None if the file verifies, else the reason it does not."""
    try:
        verified_body(Path(path), Path(path).read_bytes())
    except (CheckpointError, OSError) as exc:
        return str(exc)
    return None


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically and durably; the previous file survives any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode(payload)
    tmp = path.parent / f".{path.name}.{os.getpid()}{TEMP_SUFFIX}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        crash_point("save:temp_written")
        if tmp.read_bytes() != data:
            raise CheckpointError(f"checkpoint {tmp} read back differently from what was written (disk error?)")
        crash_point("save:before_rename")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    crash_point("save:after_rename")
    return path


def fsync_directory(directory: Path) -> None:
    """Make a rename durable: without this, a power cut can forget the new directory entry."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify, then load with ``weights_only=True``; anything wrong is a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    body = verified_body(path, path.read_bytes())
    try:
        payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} holds objects trainkit does not store (refused by safe loading): {_unpickler_reason(exc)}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {_first_line(exc)}") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{path} is not a trainkit checkpoint (no model state inside)")
    return payload


def _unpickler_reason(exc: BaseException) -> str:
    """torch's weights-only error is a page of advice; keep the line naming the refused object."""
    match = re.search(r"(Unsupported global: GLOBAL \S+|Unsupported operand \S+)", str(exc))
    return match.group(1) if match else _first_line(exc)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# ------------------------------------------------------------------- the folder
@dataclass(frozen=True)
class CheckpointName:
    """Where in training a checkpoint file was written, parsed from its name."""

    path: Path
    epoch: int
    step: int | None  # None: the end of ``epoch``; else a mid-epoch save at this global step

    @property
    def order(self) -> tuple[int, float]:
        return (self.epoch, math.inf if self.step is None else self.step)


class CheckpointDir:
    """A run's ``checkpoints/`` folder.

    Files: ``epoch-0003.pt`` (end of epoch 3), ``epoch-0004-step-00001300.pt`` (mid-epoch,
    at optimizer step 1300) and ``best.pt`` (the best epoch by the monitored metric).
    Retention keeps the newest ``keep_last`` files and every ``keep_every``-th epoch end;
    old files are deleted only after a new one is written and verified.
    """

    def __init__(self, directory: str | Path, keep_last: int = 3, keep_every: int = 0) -> None:
        self.directory = Path(directory)
        self.keep_last = max(1, keep_last)
        self.keep_every = keep_every

    @property
    def best_path(self) -> Path:
        return self.directory / BEST_FILE

    def path_for(self, epoch: int, step: int | None) -> Path:
        suffix = "" if step is None else f"-step-{step:08d}"
        return self.directory / f"epoch-{epoch:04d}{suffix}.pt"

    def checkpoints(self) -> list[CheckpointName]:
        """Epoch and step checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            if match := CHECKPOINT_NAME.match(path.name):
                step = int(match.group(2)) if match.group(2) else None
                found.append(CheckpointName(path, int(match.group(1)), step))
        return sorted(found, key=lambda name: name.order)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1].path if found else None

    def remove_temp_files(self) -> list[Path]:
        """Delete temporary files a crashed save left behind."""
        if not self.directory.is_dir():
            return []
        leftovers = [p for p in self.directory.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)]
        for path in leftovers:
            path.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted checkpoint save", path)
        return leftovers

    def newest_valid(self, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that verifies and loads; says which ones were skipped and why."""
        for name in reversed(self.checkpoints()):
            try:
                return name.path, load_checkpoint(name.path, map_location)
            except CheckpointError as exc:
                log.warning("skipping %s: %s; falling back to an older checkpoint", name.path.name, exc)
        return None

    def save(self, payload: dict[str, Any], *, epoch: int, step: int | None, is_best: bool) -> Path:
        """Write one checkpoint (and best.pt), then apply retention."""
        path = save_checkpoint(payload, self.path_for(epoch, step))
        if is_best:
            save_checkpoint(payload, self.best_path)
        self.prune()
        return path

    def prune(self) -> None:
        found = self.checkpoints()
        keep = {name.path for name in found[-self.keep_last :]}
        if self.keep_every:
            keep |= {n.path for n in found if n.step is None and n.epoch % self.keep_every == 0}
        for name in found:
            if name.path not in keep:
                crash_point("save:retention")
                name.path.unlink(missing_ok=True)
