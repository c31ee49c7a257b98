"""Sharded checkpoints (--strategy fsdp): folders written through torch.distributed.checkpoint (DCP),
with the guarantees of trainkit's one-file checkpoints (trainkit.checkpoint.file) kept.

A checkpoint ``epoch-0003.dcp/`` holds:

* ``__0_0.distcp``, ``__1_0.distcp``, ..., ``.metadata``: DCP's files. The model and optimizer
  state keyed by parameter name, each rank writing its own shards, and any weight copy a
  callback keeps (early stopping's best weights), so a later run reshards them onto its own
  number of processes.
* ``state.pt``: everything else (counters, schedule, history, every rank's RNG streams and
  running sums), in trainkit's one-file format with its sha256 trailer.
* ``manifest.json``: the size and sha256 of every other file, written last.

Saving is a collective: every rank writes its shards into ``.epoch-0003.dcp.trainkit-<pid>.tmp/``;
rank 0 then writes state.pt and the manifest, fsyncs them, re-reads and verifies the folder
and commits it with one rename. A crash at any moment leaves the previous checkpoints and a
temporary folder that the next run deletes, never a partial folder under a final name.

Loading verifies the manifest and every file's sha256 before anything is unpickled. The
weights are then either materialised whole on this process (``weights=True``: the exports,
``evaluate``, best.safetensors) or described by meta tensors of the right names and shapes
(``weights=False``: resume, where the trainer loads its own shards; see ``load_into``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from trainkit import distributed
from trainkit.errors import CheckpointCorrupt, CheckpointError, first_line
from trainkit.checkpoint.file import encode, load_file
from trainkit.faults import crash_point
from trainkit.checkpoint.rundir import fsync_directory, temp_path

MANIFEST = "manifest.json"
STATE_FILE = "state.pt"
FORMAT = "trainkit-sharded-checkpoint"
SUFFIX = ".dcp"
SHARDED_COPY = "__sharded__"  # in state.pt, marks a callback's weight copy that lives in the DCP files
CHUNK = 1 << 20


# ------------------------------------------------------------------- saving
def save_sharded(payload: dict[str, Any], path: Path) -> Path:
    """Write ``payload`` (its model and optimizer state DTensors, see trainkit.distributed.fsdp.sharded_state)
    as the folder ``path``. Every rank calls it; a failure on any rank raises on every rank, and
    the old checkpoints stay intact."""
    import torch.distributed.checkpoint as dcp

    main = distributed.is_main()
    tmp = Path(distributed.broadcast_object(str(temp_path(path)) if main else None))
    arrays, state = split_payload(payload)
    try:
        dcp.save(arrays, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write the shards of {path.name}: {dcp_problem(exc)}") from None
    crash_point("save:shards_written")
    problem = None
    if main:
        try:
            commit(state, tmp, path)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            problem = f"could not commit {path.name}: {first_line(exc)}"
    problem = distributed.broadcast_object(problem)  # DDP/FSDP agreement point: every rank learns the outcome
    if problem is not None:
        raise CheckpointError(problem)
    return path


def split_payload(payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what DCP writes: model, optimizer and callbacks' sharded weight copies; the rest, for state.pt)."""
    from trainkit.distributed.fsdp import holds_dtensors

    arrays = {"model": payload["model"], "optimizer": payload["optimizer"]}
    callbacks: dict[str, Any] = {}
    for key, saved in payload["callbacks"].items():
        callbacks[key] = dict(saved)
        for name, value in saved.items():
            if not holds_dtensors(value):
                continue
            if not isinstance(value, dict) or set(value) != set(payload["model"]):
                raise CheckpointError(f"callback {key}'s {name!r} holds sharded tensors that are not a copy of the "
                                      f"model's weights; an FSDP checkpoint cannot save it")  # fmt: skip
            arrays[f"callback:{key}:{name}"] = value
            callbacks[key][name] = {SHARDED_COPY: f"callback:{key}:{name}"}
    state = {**payload, "model": {}, "optimizer": {}, "callbacks": callbacks}
    return arrays, state


def commit(state: dict[str, Any], tmp: Path, path: Path) -> None:
    """Rank 0: state.pt and the manifest into the shards' folder, verify it, rename it to ``path``."""
    write_synced(tmp / STATE_FILE, encode(state))
    files = {name: file_digest(tmp / name) for name in sorted(folder_files(tmp))}
    write_synced(tmp / MANIFEST, json.dumps({"format": FORMAT, "version": 1, "files": files}, indent=1).encode())
    fsync_directory(tmp)
    try:
        check_folder(tmp)
    except CheckpointError as exc:
        raise CheckpointError(f"{tmp} read back differently from what was written ({exc}; disk error?)") from None
    crash_point("save:before_rename")
    replace_folder(tmp, path)
    fsync_directory(path.parent)
    crash_point("save:after_rename")


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def replace_folder(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; an existing ``target`` (best.dcp) is moved aside first and deleted."""
    if not target.exists():
        os.replace(source, target)
        return
    aside = temp_path(target.with_name(f"{target.name}.old"))
    os.replace(target, aside)
    os.replace(source, target)
    shutil.rmtree(aside, ignore_errors=True)


def remove_folder(path: Path) -> None:
    """Delete a checkpoint folder: renamed to a temporary name first, so a crash midway never
    leaves a partial folder under a checkpoint's name."""
    doomed = temp_path(path)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def dcp_problem(exc: BaseException) -> str:
    """The first rank's own error inside DCP's CheckpointException (else the error's first line)."""
    failures = getattr(exc, "failures", None)
    if failures:
        rank, wrapped = sorted(failures.items())[0]
        inner = getattr(wrapped, "exc", wrapped)
        return f"rank {rank}: {first_line(inner)}"
    return first_line(exc)


# -------------------------------------------------------------- verification
def is_sharded_checkpoint(path: Path) -> bool:
    """A folder that is (or was meant to be) a sharded checkpoint; other folders are not checkpoints at all."""
    return path.is_dir() and (path.suffix == SUFFIX or any((path / name).exists() for name in (MANIFEST, ".metadata")))


def folder_files(folder: Path) -> Iterator[str]:
    """Every file under ``folder`` but the manifest, as paths relative to it."""
    for root, _, names in os.walk(folder):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), folder)
            if relative != MANIFEST:
                yield relative


def file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointCorrupt(f"checkpoint {folder} has no {MANIFEST}: an unfinished save, or not a trainkit "
                                f"sharded checkpoint") from None  # fmt: skip
    except OSError as exc:  # may pass (permissions, EIO): says nothing about the files
        raise CheckpointError(f"cannot read checkpoint {folder}'s {MANIFEST}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointCorrupt(f"checkpoint {folder}'s {MANIFEST} is unreadable: {first_line(exc)}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT or STATE_FILE not in files or ".metadata" not in files:
        raise CheckpointCorrupt(f"checkpoint {folder}'s {MANIFEST} is not a trainkit sharded checkpoint's")
    return manifest


def check_folder(folder: Path) -> None:
    """Every file the manifest lists is there with its size and sha256: else CheckpointCorrupt, or
    CheckpointError when a file cannot be read right now (which says nothing about its bytes)."""
    files = read_manifest(folder)["files"]
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointCorrupt(f"checkpoint {folder} lacks {name}")
        try:
            found = file_digest(path)
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {folder}: {name}: {exc.strerror or exc}") from None
        if found != expected:
            what = "size" if found["bytes"] != expected.get("bytes") else "sha256"
            raise CheckpointCorrupt(f"checkpoint {folder}: {name} fails its {what} check (corrupted or edited)")


# ------------------------------------------------------------------- loading
def load_sharded(folder: Path, *, weights: bool = True) -> dict[str, Any]:
    """A sharded checkpoint's payload after verifying every file; see the module docstring for ``weights``."""
    check_folder(folder)
    payload = load_file(folder / STATE_FILE)
    shapes = model_shapes(folder)
    if weights:
        model = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in shapes.items()}
        load_into(folder, {"model": model}, collective=False)
        payload["model"] = model
    else:
        payload["model"] = {key: torch.empty(shape, dtype=dtype, device="meta") for key, (shape, dtype) in shapes.items()}
    payload["sharded"] = str(folder)
    return payload


def model_shapes(folder: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """The model's state_dict names, shapes and dtypes, from DCP's metadata (no tensor is read)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(folder).read_metadata()
    except Exception as exc:
        raise CheckpointError(f"checkpoint {folder}'s DCP metadata is unreadable: {first_line(exc)}") from None
    return {key.removeprefix("model."): (entry.size, entry.properties.dtype)
            for key, entry in metadata.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)}  # fmt: skip


def load_into(folder: Path, state: dict[str, Any], *, collective: bool = True) -> None:
    """Fill ``state``'s tensors (whole tensors or this rank's DTensor shards) from the folder's DCP
    files, resharding from the world size that wrote them. ``collective``: every rank of the
    process group calls it (resume); else this process reads alone."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, checkpoint_id=folder, no_dist=not (collective and distributed.is_active()))
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"checkpoint {folder} does not fit this run: {dcp_problem(exc)}") from None


def sharded_copies(callbacks: dict[str, Any]) -> list[str]:
    """The DCP keys of the callbacks' weight copies that a sharded checkpoint stores."""
    return [value[SHARDED_COPY] for saved in callbacks.values() for value in saved.values()
            if isinstance(value, dict) and SHARDED_COPY in value]  # fmt: skip


def with_copies(callbacks: dict[str, Any], loaded: dict[str, Any]) -> dict[str, Any]:
    """The callbacks' saved states with each weight copy marker replaced by its loaded tensors."""
    return {key: {name: loaded[value[SHARDED_COPY]] if isinstance(value, dict) and SHARDED_COPY in value else value
                  for name, value in saved.items()}
            for key, saved in callbacks.items()}  # fmt: skip
