"""A run's checkpoints: which files there are, which to resume from, which to keep.

``CheckpointDir`` names, saves, lists, verifies and prunes the checkpoints of one run folder;
a checkpoint is one file (trainkit.checkpoint.file) or, under ``--strategy fsdp``, a folder of
shards (trainkit.checkpoint.sharded), and ``load_checkpoint`` and ``check_integrity`` take
either. Only a checkpoint that fails its own integrity check is ever set aside (renamed
``*.corrupt``); one that cannot be read now is left as it was.
"""


from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from trainkit.errors import CheckpointCorrupt, CheckpointError
from trainkit.distributed import is_main
from trainkit.faults import crash_point
from trainkit.distributed.fsdp import holds_dtensors
from trainkit.checkpoint.rundir import is_disk_full, remove_stale_temp_files

log = logging.getLogger("trainkit")
from trainkit.checkpoint.file import load_file, read_checkpoint_bytes, save_checkpoint, verified_body
from trainkit.checkpoint.sharded import SUFFIX as SHARDED_SUFFIX
from trainkit.checkpoint.sharded import check_folder, is_sharded_checkpoint, load_sharded, remove_folder, save_sharded


CHECKPOINT_NAME = re.compile(r"^epoch-(\d+)(?:-step-(\d+))?\.(?:pt|dcp)$")  # .dcp: a sharded folder
BEST_FILE = "best.pt"
SHARDED_BEST = "best.dcp"
SET_ASIDE_SUFFIX = ".corrupt"  # a file resume could not use, renamed out of the way and kept for inspection


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


def load_checkpoint(path: str | Path, *, weights: bool = True) -> dict[str, Any]:
    """A checkpoint file's payload (trainkit.checkpoint.file.load_file), or a sharded folder's
    (trainkit.checkpoint.sharded): ``weights=False`` leaves a folder's weights as meta tensors
    (resume loads each rank's shards itself). Always to the host; anything wrong is a
    CheckpointError naming the file."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return load_sharded(path, weights=weights)
    return load_file(path)


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
    --strategy fsdp the same names end in ``.dcp`` and are folders (trainkit.checkpoint.sharded).
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
