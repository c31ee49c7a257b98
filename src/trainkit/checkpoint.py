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
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainkit.devices import HOST
from trainkit.errors import CheckpointCorrupt, CheckpointError, first_line
from trainkit.distributed import is_main
from trainkit.faults import crash_point
from trainkit.fsdp import holds_dtensors
from trainkit.rundir import fsync_directory, is_disk_full, remove_stale_temp_files, temp_path
from trainkit.sharded_checkpoint import SUFFIX as SHARDED_SUFFIX
from trainkit.sharded_checkpoint import check_folder, is_sharded_checkpoint, load_sharded, remove_folder, save_sharded

log = logging.getLogger("trainkit")

TRAILER_MAGIC = b"TRAINKIT-SHA256:"
TRAILER_SIZE = len(TRAILER_MAGIC) + 64 + 1
CHECKPOINT_NAME = re.compile(r"^epoch-(\d+)(?:-step-(\d+))?\.(?:pt|dcp)$")  # .dcp: a sharded folder
BEST_FILE = "best.pt"
SHARDED_BEST = "best.dcp"
SET_ASIDE_SUFFIX = ".corrupt"  # a file resume could not use, renamed out of the way and kept for inspection
# What every trainkit checkpoint holds, and the type each entry must have: a file with a valid
# trailer can still be hand-made, and resume must fall back past it instead of failing deep inside.
PAYLOAD_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "config": dict, "run_info": dict, "model": dict, "optimizer": dict, "scheduler": (dict, type(None)),
    "scaler": dict, "epoch": int, "position": (dict, type(None)), "global_step": int, "history": list,
    "best_metric": (float, int, type(None)), "best_epoch": (int, type(None)), "rollbacks": int,
    "lr_scale": (float, int), "callbacks": dict, "rng": dict,
}  # fmt: skip


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
        raise CheckpointCorrupt(f"checkpoint {path} is empty")
    trailer = data[-TRAILER_SIZE:]
    if len(data) <= TRAILER_SIZE or not trailer.startswith(TRAILER_MAGIC) or not trailer.endswith(b"\n"):
        raise CheckpointCorrupt(f"checkpoint {path} has no integrity trailer: truncated, or not written by trainkit")
    body, expected = data[:-TRAILER_SIZE], trailer[len(TRAILER_MAGIC) : -1].decode("ascii", "replace")
    if hashlib.sha256(body).hexdigest() != expected:
        raise CheckpointCorrupt(f"checkpoint {path} fails its sha256 check: corrupted or edited")
    return body


def verify_checkpoint(path: str | Path) -> str | None:
    """None if the file (or sharded folder) verifies, else the reason it does not (damage or a read error)."""
    try:
        check_integrity(Path(path))
    except CheckpointError as exc:
        return str(exc)
    return None


def damage_of(path: str | Path) -> str | None:
    """Why the file (or sharded folder) fails its own integrity check, or None: None too when it
    cannot be read right now (a read error says nothing about the bytes, so nothing is set aside)."""
    try:
        check_integrity(Path(path))
    except CheckpointCorrupt as exc:
        return str(exc)
    except CheckpointError:
        pass
    return None


def check_integrity(path: Path) -> None:
    """CheckpointCorrupt when the bytes fail their sha256 (or a folder its manifest), CheckpointError
    when they cannot be read."""
    if is_sharded_checkpoint(path):
        check_folder(path)
    else:
        verified_body(path, read_checkpoint_bytes(path))


def require_checkpoint_file(path: Path) -> None:
    """A missing file, a folder, a FIFO or a device is refused before anything reads (or blocks on) it."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} does not exist" if isinstance(exc, FileNotFoundError)
                              else f"cannot read checkpoint {path}: {exc.strerror}") from None  # fmt: skip
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"checkpoint {path} is not a regular file (a folder, FIFO or device)")


def read_checkpoint_bytes(path: Path) -> bytes:
    require_checkpoint_file(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except MemoryError:
        raise CheckpointError(f"not enough memory to read checkpoint {path}") from None


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically and durably; the previous file survives any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode(payload)
    tmp = temp_path(path)
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


def load_checkpoint(path: str | Path, *, weights: bool = True) -> dict[str, Any]:
    """Verify, then load to the host with ``weights_only=True`` and check the payload's structure.

    Always to the host (trainkit.devices): the run places each part where it lives. Loading to
    the training device would hand ``torch.set_rng_state`` a CUDA tensor, which it refuses.

    Anything wrong is a CheckpointError naming the file: the bytes may verify yet not be a
    torch file, or be a hand-made payload with keys missing or of the wrong type. A sharded
    checkpoint (a folder) is trainkit.sharded_checkpoint's; ``weights=False`` leaves its weights
    as meta tensors (resume loads each rank's shards itself).
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        return load_sharded(path, weights=weights)
    body = verified_body(path, read_checkpoint_bytes(path))
    try:
        payload = torch.load(io.BytesIO(body), map_location=HOST, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointCorrupt(
            f"checkpoint {path} holds objects trainkit does not store (refused by safe loading): {_unpickler_reason(exc)}"
        ) from None
    except (MemoryError, torch.OutOfMemoryError, OSError) as exc:  # may pass: says nothing about the file
        raise CheckpointError(f"cannot load checkpoint {path} now: {first_line(exc) if str(exc) else 'out of memory'}") from None
    except Exception as exc:  # torch's readers raise RuntimeError, KeyError, EOFError, ... on foreign bytes
        raise CheckpointCorrupt(f"checkpoint {path} is not a readable torch file: {first_line(exc)}") from None
    problem = payload_problem(payload)
    if problem is not None:
        raise CheckpointCorrupt(f"{path} is not a complete trainkit checkpoint: {problem}")
    return payload


def payload_problem(payload: Any) -> str | None:
    """What is missing or mistyped in a checkpoint payload (None: it has the full structure)."""
    if not isinstance(payload, dict) or "model" not in payload:
        return "no model state inside"
    for key, expected in PAYLOAD_SCHEMA.items():
        if key not in payload:
            return f"{key!r} is missing"
        value = payload[key]
        if not isinstance(value, expected) or isinstance(value, bool):
            return f"{key!r} is {type(value).__name__}, expected {_type_names(expected)}"
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in payload["model"].items()):
        return "'model' is not a state_dict of named tensors"
    if not all(isinstance(row, dict) for row in payload["history"]):
        return "'history' is not a list of metric rows"
    position = payload["position"]
    if position is not None and not (isinstance(position.get("batches_done"), int) and isinstance(position.get("meter"), dict)):
        return "'position' lacks batches_done or meter"
    missing_rng = {"torch", "cuda", "python", "numpy"} - set(payload["rng"])
    if missing_rng:
        return f"'rng' lacks {', '.join(sorted(missing_rng))}"
    return None


def _type_names(expected: type | tuple[type, ...]) -> str:
    options = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join("None" if t is type(None) else t.__name__ for t in options)


def _unpickler_reason(exc: BaseException) -> str:
    """torch's weights-only error is a page of advice; keep the words naming the refused object."""
    text = str(exc)
    match = re.search(r"(?:Unsupported global: )?GLOBAL (\S+)", text)
    if match:
        return f"refused global {match.group(1)}"
    match = re.search(r"Unsupported operand \S+", text)
    return match.group(0) if match else first_line(exc)


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
    at optimizer step 1300) and ``best.pt`` (the best epoch by the monitored metric); under
    --strategy fsdp the same names end in ``.dcp`` and are folders (trainkit.sharded_checkpoint).
    Retention keeps the newest ``keep_last`` checkpoints, every ``keep_every``-th epoch end and
    the one just written (verified by its read-back); old ones are deleted only after a new one
    is written. A checkpoint that resume cannot use is renamed ``NAME.corrupt``, so it neither
    counts toward ``keep_last`` nor pushes a good one out.

    A sharded save is a collective: every rank calls ``save``/``save_best``; rank 0 alone
    commits the folder and applies retention.
    """

    def __init__(self, directory: str | Path, keep_last: int = 3, keep_every: int = 0) -> None:
        self.directory = Path(directory)
        self.keep_last = max(1, keep_last)
        self.keep_every = keep_every

    @property
    def best_path(self) -> Path:
        """best.pt, or best.dcp when a sharded run wrote one."""
        sharded = self.directory / SHARDED_BEST
        return sharded if sharded.is_dir() else self.directory / BEST_FILE

    def path_for(self, epoch: int, step: int | None, *, sharded: bool = False) -> Path:
        suffix = "" if step is None else f"-step-{step:08d}"
        return self.directory / f"epoch-{epoch:04d}{suffix}{SHARDED_SUFFIX if sharded else '.pt'}"

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
        """Delete temporary files that crashed saves left behind (never those of a live writer)."""
        return remove_stale_temp_files(self.directory, folders=True)  # sharded checkpoints' temp folders too

    def newest_valid(
        self,
        *,
        check: Callable[[dict[str, Any]], None] | None = None,
        include_best: bool = False,
        set_aside: bool = True,
        strict: bool = False,
        weights: bool = True,
    ) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that verifies, loads and passes ``check`` (which raises CheckpointError).

        A file that fails its own integrity check (CheckpointCorrupt) is named with the reason and,
        with ``set_aside``, renamed ``NAME.corrupt``; resume falls back past it. Any other problem
        (a read error that may pass, weights that do not fit the model) is about the run, not the
        file: ``strict`` (resume) refuses with it and changes nothing, else the file is skipped.
        ``include_best``: when no epoch or step checkpoint is usable, a usable best checkpoint
        (always an epoch-end save) is the last resort. ``weights``: see load_checkpoint.
        """
        candidates = [name.path for name in reversed(self.checkpoints())]
        if include_best and self.best_path.exists():
            candidates.append(self.best_path)
        for path in candidates:
            try:
                payload = load_checkpoint(path, weights=weights)
                if check is not None:
                    check(payload)
            except CheckpointCorrupt as exc:
                kept = self.set_aside(path) if set_aside else "left it in place"
                log.warning("skipping %s: %s; %s and falling back to an older checkpoint", path.name, exc, kept)
                continue
            except CheckpointError as exc:
                if strict:
                    raise CheckpointError(
                        f"cannot resume from {path}: {exc}. It was not renamed or deleted, nor was any other file: "
                        f"fix this (restore the model's code or settings, the file's permissions, free memory) and "
                        f"run the same command again"
                    ) from None
                log.warning("skipping %s: %s", path.name, exc)
                continue
            if path == self.best_path:
                log.warning("no epoch or step checkpoint in %s is usable; using %s (end of epoch %d)",
                            self.directory, path.name, payload["epoch"])  # fmt: skip
            return path, payload
        return None

    def set_aside_files(self) -> list[Path]:
        """Files resume renamed ``*.corrupt`` earlier."""
        return sorted(self.directory.glob(f"*{SET_ASIDE_SUFFIX}")) if self.directory.is_dir() else []

    def set_aside(self, path: Path) -> str:
        """Rename an unusable file ``NAME.corrupt``: out of resume's and retention's way, kept for a look.
        Returns what was done, for the log line."""
        target = path.with_name(path.name + SET_ASIDE_SUFFIX)
        try:
            os.replace(path, target)
        except OSError as exc:
            return f"could not rename it ({exc.strerror})"
        return f"renamed it {target.name}"

    def save(self, payload: dict[str, Any], *, epoch: int, step: int | None) -> Path:
        """Write one epoch or step checkpoint, then apply retention."""
        sharded = holds_dtensors(payload["model"])
        path = self._write(payload, self.path_for(epoch, step, sharded=sharded))
        if not sharded or is_main():
            self.prune(keep=path)
        return path

    def save_best(self, payload: dict[str, Any]) -> Path:
        sharded = holds_dtensors(payload["model"])
        return self._write(payload, self.directory / (SHARDED_BEST if sharded else BEST_FILE))

    def _write(self, payload: dict[str, Any], path: Path) -> Path:
        """save_checkpoint; on a full disk, make room once (older retained checkpoints) and retry.
        A sharded save is not retried: a full disk is the failed save it reports."""
        if path.suffix == SHARDED_SUFFIX:
            self.directory.mkdir(parents=True, exist_ok=True)
            return save_sharded(payload, path)
        try:
            return save_checkpoint(payload, path)
        except OSError as exc:
            if not is_disk_full(exc) or not self.make_room():
                raise
        return save_checkpoint(payload, path)

    def make_room(self) -> bool:
        """Disk full: delete retained checkpoints except the newest that verifies and every
        ``keep_every``-th epoch; without this a full disk stays full and every later save fails."""
        found = self.checkpoints()
        newest_good = next((n.path for n in reversed(found) if verify_checkpoint(n.path) is None), None)
        protected = {newest_good} | self._every_kth_epoch(found)
        victims = [n.path for n in found if n.path not in protected]
        for path in victims:
            remove_checkpoint(path)
        if victims:
            log.warning("disk full: deleted %s to make room (kept %s)", ", ".join(p.name for p in victims),
                        newest_good.name if newest_good else "no verifying checkpoint")  # fmt: skip
        return bool(victims)

    def prune(self, keep: Path | None = None) -> None:
        """Retention; ``keep`` (the checkpoint just written and verified) survives whatever its name."""
        found = self.checkpoints()
        kept = {name.path for name in found[-self.keep_last :]} | self._every_kth_epoch(found) | {keep}
        for name in found:
            if name.path not in kept:
                crash_point("save:retention")
                remove_checkpoint(name.path)

    def _every_kth_epoch(self, found: list[CheckpointName]) -> set[Path]:
        if not self.keep_every:
            return set()
        return {n.path for n in found if n.step is None and n.epoch % self.keep_every == 0}


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint file, or a sharded checkpoint's folder."""
    if path.is_dir():
        remove_folder(path)
    else:
        path.unlink(missing_ok=True)


def state_dict_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Why ``state`` cannot be loaded into ``model`` (missing, unexpected or differently shaped
    entries), or None. Checked before loading, so the error is one line instead of torch's page."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state
              and tuple(state[k].shape) != tuple(own[k].shape)]  # fmt: skip
    problems = [f"missing {', '.join(missing[:3])}" if missing else "",
                f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
                f"shape of {'; '.join(shapes[:3])}" if shapes else ""]  # fmt: skip
    problems = [p for p in problems if p]
    return "; ".join(problems) or None
