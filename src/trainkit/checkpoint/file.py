"""One checkpoint file: atomic, self-verifying, safely loaded.

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
import os
import pickle
import re
import stat
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainkit.devices import HOST
from trainkit.errors import CheckpointCorrupt, CheckpointError, first_line
from trainkit.faults import crash_point
from trainkit.checkpoint.rundir import fsync_directory, temp_path

log = logging.getLogger("trainkit")

TRAILER_MAGIC = b"TRAINKIT-SHA256:"
TRAILER_SIZE = len(TRAILER_MAGIC) + 64 + 1
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


def load_file(path: str | Path) -> dict[str, Any]:
    """Verify, then load to the host with ``weights_only=True`` and check the payload's structure.

    Always to the host (trainkit.devices): the run places each part where it lives. Loading to
    the training device would hand ``torch.set_rng_state`` a CUDA tensor, which it refuses.

    Anything wrong is a CheckpointError naming the file: the bytes may verify yet not be a
    torch file, or be a hand-made payload with keys missing or of the wrong type.
    """
    path = Path(path)
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
