"""Checkpoints: write atomically, load safely, find the latest.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads
with ``torch.load(weights_only=True)`` and never unpickles arbitrary objects. Files are
written to a temporary name in the same directory and renamed into place, so a crash
mid-write never leaves a partial file under a checkpoint's name.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainkit.errors import CheckpointError

EPOCH_FILE = re.compile(r"^epoch-(\d+)\.pt$")
BEST_FILE = "best.pt"


def model_sha256(model_or_state: nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 over the state_dict's tensors (keys sorted, raw bytes): equal iff weights are equal."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``; anything else is refused with a reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} holds objects trainkit does not store (refused by safe loading): {_unpickler_reason(exc)}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {_first_line(exc)}") from None
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


class CheckpointDir:
    """The ``checkpoints/`` folder of a run: one file per epoch (the last few kept) and ``best.pt``."""

    def __init__(self, directory: str | Path, keep_last: int = 3) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last

    def epoch_path(self, epoch: int) -> Path:
        return self.directory / f"epoch-{epoch:04d}.pt"

    @property
    def best_path(self) -> Path:
        return self.directory / BEST_FILE

    def epoch_files(self) -> list[Path]:
        """Epoch checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := EPOCH_FILE.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        files = self.epoch_files()
        return files[-1] if files else None

    def save(self, payload: dict[str, Any], epoch: int, *, is_best: bool) -> Path:
        """Write this epoch's checkpoint (and best.pt), then drop epoch files beyond ``keep_last``."""
        path = save_checkpoint(payload, self.epoch_path(epoch))
        if is_best:
            save_checkpoint(payload, self.best_path)
        for old in self.epoch_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path
