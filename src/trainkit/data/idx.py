"""IDX files (MNIST's format): reading them with structural checks, and downloading a file
with its checksum verified.

Checksums
    Downloaded files are verified against the official md5 of each ``.gz``; a mismatch counts
    as a failed attempt and the file never appears under its final name (downloads go to a
    temporary file that is atomically renamed). Files in a local directory (``data_dir``,
    ``$TRAINKIT_DATA_DIR`` or a pre-filled cache) are NOT md5-checked, only structurally
    validated by ``read_idx``: a faithful re-creation such as the shared CI copy of MNIST's
    ``train-images`` (pixels within 1/255 of the official ones, different checksum) must load
    exactly as the official file does. Local files may be gzip-compressed (``*.gz``) or
    plain (the same name without ``.gz``).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
import torch

from trainkit.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------
# IDX reading
# ---------------------------------------------------------------------------------------------

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UNSIGNED_BYTE = 0x08
_IDX_TYPE_NAMES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "short",
    0x0C: "int",
    0x0D: "float",
    0x0E: "double",
}
_IDX_MAX_DIMS = 4
REPLACE_HINT = (
    "The file is damaged or not an IDX file: replace it with a fresh copy "
    "(delete it from the trainkit cache and it is downloaded again)."
)


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (gzip-compressed or raw) into a uint8 tensor of its stored shape.

    Compression is detected from the gzip magic bytes, not the extension, so a decompressed
    file that kept its ``.gz`` name still loads. Every structural problem is a ``DataError``
    naming the file, because a half-read dataset silently trains on garbage.
    """
    path = Path(path)
    payload = _decompress_if_gzip(path, _read_file_bytes(path))
    dims, header_len = _parse_idx_header(path, payload)
    _check_data_length(path, dims, len(payload) - header_len)
    array = np.frombuffer(payload, dtype=np.uint8, offset=header_len).reshape(dims)
    return torch.from_numpy(array.copy())  # copy: frombuffer over bytes is read-only


def _read_file_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found.") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected an IDX file.") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc}).") from None


def _decompress_if_gzip(path: Path, raw: bytes) -> bytes:
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(
            f"{path}: corrupt or truncated gzip stream ({exc}). {REPLACE_HINT}"
        ) from None


def _parse_idx_header(path: Path, payload: bytes) -> tuple[tuple[int, ...], int]:
    """Validate the big-endian IDX header; return (dims, header length in bytes)."""
    if len(payload) < 4:
        raise DataError(
            f"{path}: IDX header too short: file has {len(payload)} bytes, "
            f"the magic number alone needs 4. {REPLACE_HINT}"
        )
    zero, type_code, ndim = payload[0:2], payload[2], payload[3]
    if zero != b"\x00\x00":
        magic = int.from_bytes(payload[0:4], "big")
        raise DataError(f"{path}: wrong magic number 0x{magic:08X}, not an IDX file. {REPLACE_HINT}")
    if type_code != _IDX_UNSIGNED_BYTE:
        kind = _IDX_TYPE_NAMES.get(type_code, "unknown")
        raise DataError(
            f"{path}: unsupported IDX type code 0x{type_code:02X} ({kind}); "
            f"only 0x08 (unsigned byte) is supported."
        )
    if not 1 <= ndim <= _IDX_MAX_DIMS:
        raise DataError(
            f"{path}: IDX header declares {ndim} dimensions; expected 1 to {_IDX_MAX_DIMS}. "
            f"{REPLACE_HINT}"
        )
    header_len = 4 + 4 * ndim
    if len(payload) < header_len:
        raise DataError(
            f"{path}: IDX header too short: {ndim} dimensions need a {header_len}-byte header, "
            f"file has {len(payload)} bytes. {REPLACE_HINT}"
        )
    dims = tuple(int.from_bytes(payload[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if 0 in dims:
        raise DataError(f"{path}: IDX header has a zero-sized dimension {dims}. {REPLACE_HINT}")
    return dims, header_len


def _check_data_length(path: Path, dims: tuple[int, ...], found: int) -> None:
    expected = math.prod(dims)
    if found < expected:
        raise DataError(
            f"{path}: truncated IDX file: shape {dims} expects {expected} data bytes, "
            f"found {found}. {REPLACE_HINT}"
        )
    if found > expected:
        raise DataError(
            f"{path}: {found - expected} trailing bytes after the data: shape {dims} expects "
            f"{expected} data bytes, found {found}. {REPLACE_HINT}"
        )


class _ChecksumMismatch(Exception):
    pass


def download_file(
    urls: Sequence[str],
    dest: Path,
    md5: str,
    *,
    retries: int = 3,
    timeout: float = 30.0,
    backoff: float = 1.0,
) -> Path:
    """Download the first URL whose bytes match ``md5`` to ``dest``, atomically.

    Each URL is tried up to ``retries`` times (sleeping ``backoff * attempt`` between tries).
    Bytes stream into a temporary file next to ``dest`` that is renamed over it only after
    the checksum matched, so ``dest`` is either absent or complete, even after a crash.
    """
    if not urls:
        raise ConfigError("download_file needs at least one URL.")
    if retries < 1:
        raise ConfigError(f"retries must be >= 1, got {retries}.")
    dest = Path(dest)
    _make_dir(dest.parent)
    last_errors: dict[str, str] = {}
    for url in urls:
        for attempt in range(1, retries + 1):
            try:
                _fetch_verified(url, dest, md5.lower(), timeout)
                return dest
            except (_ChecksumMismatch, OSError, http.client.HTTPException, ValueError) as exc:
                last_errors[url] = _describe_download_error(exc)
                if _is_permanent(exc):
                    break
            if attempt < retries and backoff > 0:
                time.sleep(backoff * attempt)
    tried = "; ".join(f"{url} ({error})" for url, error in last_errors.items())
    raise DataError(f"failed to download {dest.name} to {dest.parent}. Tried: {tried}.")


def _make_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create directory {folder} ({exc.strerror or exc}); set TRAINKIT_CACHE_DIR "
            f"to a writable folder."
        ) from None


def _fetch_verified(url: str, dest: Path, md5: str, timeout: float) -> None:
    tmp = tempfile.NamedTemporaryFile(
        dir=dest.parent, prefix=f".{dest.name}.", suffix=".part", delete=False
    )
    try:
        with tmp:
            digest = _stream_to(url, tmp, timeout)
            if digest != md5:
                raise _ChecksumMismatch(f"md5 mismatch: got {digest}, expected {md5}")
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, dest)
    except BaseException:
        _remove_quietly(Path(tmp.name))
        raise


def _stream_to(url: str, out: IO[bytes], timeout: float, chunk_size: int = 1 << 20) -> str:
    """Copy the URL's body into ``out``; return the md5 hex digest of what was written."""
    digest = hashlib.md5()
    request = urllib.request.Request(url, headers={"User-Agent": "trainkit"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        while chunk := response.read(chunk_size):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _is_permanent(exc: Exception) -> bool:
    """A 4xx answer (other than timeout / rate limit) will not change on retry."""
    if isinstance(exc, urllib.error.HTTPError):
        return 400 <= exc.code < 500 and exc.code not in (408, 429)
    return isinstance(exc, ValueError)  # malformed URL


def _describe_download_error(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__
