"""A text file as token ids: the split, random training windows and whole-split validation.

The split is by position, never shuffled across the boundary: the first ``1 - val_fraction``
of the characters train (and train the tokenizer), the rest validates. Token ids live in one
int32 tensor per split (4 bytes a token; the 4.3 MB KJV text is 17 MB of ids).

Training batches (``RandomWindows``) are ``batch_size`` windows of ``block_size + 1`` tokens at
random offsets, drawn for global batch b of epoch e from a generator seeded by (seed, e, b)
alone: a resume at any step replays exactly the windows of an uninterrupted run, and under
DDP every rank draws the same global batch and takes its slice. An "epoch" is as many
windows as hold the training split's tokens once; a ``--max-steps`` budget usually ends first.

Validation is the whole validation split cut into non-overlapping windows (the last
``< block_size`` tokens, which fill no window, are left out), so ``val_loss`` is the mean
loss per token over all of it, not an estimate from a few random batches.
"""

from __future__ import annotations

import codecs
import math
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from trainkit.data.dataset import batch_seed
from trainkit.data.device import DeviceBatches, rank_slice
from trainkit.errors import ConfigError, DataError
from trainkit.loop.memory import GiB, MiB, available_memory_bytes
from trainkit.recipes.text.tokenizers import Tokenizer, code_point_chunks, train_tokenizer

# Peak memory of load_text a byte of the file, by tokenizer (measured on the KJV text x5: char
# 5.3x ASCII, 6.2x with one 3-byte character first, 8.0x with one emoji first; byte 5.7x; bpe
# 10.1x): the bytes while they decode, the text as a str (1 byte a character if ASCII, 2 or 4
# once one character is wider) and its two split copies, then int32 ids, 4 bytes a token.
LOAD_BYTES_PER_FILE_BYTE = {"char": 8, "byte": 8, "bpe": 12}
# Not text: control characters (Unicode's Cc: C0, DEL and C1, less tab, newline, form feed and
# carriage return) above this share of the characters, or this many NULs anywhere (a block of
# zeros, what a sparse or zeroed region reads as; no text holds one).
CONTROL_SHARE_LIMIT = 0.10
NUL_LIMIT = 4096
IS_CONTROL = np.array([unicodedata.category(chr(c)) == "Cc" and chr(c) not in "\t\n\f\r" for c in range(0xA1)])


@dataclass
class TextData:
    """A text run's data: the tokenizer and each split's ids (``val`` None with --val-fraction 0)."""

    name: str
    path: str
    tokenizer: Tokenizer
    train: Tensor
    val: Tensor | None
    test: None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def read_text(path: str | Path | None, *, tokenizer: str = "char") -> str:
    """A UTF-8 text file less its byte-order mark, or a one-line error saying what is wrong with it;
    ``tokenizer``: the one that will encode it, for the memory check."""
    path = regular_file(path)
    require_memory_to_load(path, tokenizer)
    text = decode_utf8(path, read_bytes(path))
    if not text or text.isspace():
        raise DataError(f"--data-file {path} holds no text")
    require_mostly_printable(path, text)
    return text


def regular_file(path: str | Path | None) -> Path:
    """``path`` once it names a regular file (a FIFO or a device such as /dev/zero would hang or never end)."""
    if path is None:
        raise ConfigError("--dataset text needs --data-file FILE (any UTF-8 text file)")
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data-file {path} does not exist")
    if not path.is_file():
        raise DataError(f"--data-file {path} is not a regular file" + (" (it is a folder)" if path.is_dir() else ""))
    return path


def require_memory_to_load(path: Path, tokenizer: str) -> None:
    """Refuse, before reading, a file whose text and ids cannot fit in the memory available now:
    on CPU, running out is not an exception but swapping or the OOM killer."""
    size = path.stat().st_size
    per_byte = LOAD_BYTES_PER_FILE_BYTE.get(tokenizer, max(LOAD_BYTES_PER_FILE_BYTE.values()))
    need, available = size * per_byte, available_memory_bytes()
    if need > available:
        raise DataError(f"--data-file {path} is {readable_size(size)}; reading and encoding it (--tokenizer "
                        f"{tokenizer}) needs about {readable_size(need)} of memory but {readable_size(available)} "
                        f"is available; train on part of it (e.g. head -c) or on a machine with more memory")  # fmt: skip


def readable_size(size: float) -> str:
    return f"{size / GiB:,.1f} GiB" if size >= GiB else f"{size / MiB:,.1f} MiB"


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read --data-file {path}: {exc.strerror or exc}") from None


def decode_utf8(path: Path, data: bytes) -> str:
    """``data`` as text, less a leading byte-order mark: decoding starts after it, as slicing it off
    the text would copy the whole text."""
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return str(memoryview(data)[start:], "utf-8")
    except UnicodeDecodeError as exc:
        byte = start + exc.start
        raise DataError(f"--data-file {path} is not UTF-8 text (byte {byte} is {data[byte]:#04x}); "
                        f"convert it with e.g. iconv -t utf-8") from None  # fmt: skip


def require_mostly_printable(path: Path, text: str) -> None:
    """Refuse text that is mostly control characters: a zeroed or sparse file is valid UTF-8 (NUL is
    a character) and would train to token accuracy 1.0 on nothing."""
    controls, nuls = control_counts(text)
    if controls > CONTROL_SHARE_LIMIT * len(text) or nuls >= NUL_LIMIT:
        raise DataError(f"--data-file {path} is not text: {controls:,} of its {len(text):,} characters are "
                        f"control characters ({nuls:,} NUL); is it binary or a sparse/zeroed file?")  # fmt: skip


def control_counts(text: str) -> tuple[int, int]:
    """(control characters, NULs) in ``text``, counted a piece at a time."""
    controls = nuls = 0
    for _, codepoints in code_point_chunks(text):
        controls += int(np.count_nonzero(IS_CONTROL[np.minimum(codepoints, len(IS_CONTROL) - 1)]))
        nuls += int(np.count_nonzero(codepoints == 0))
    return controls, nuls


def load_text(
    path: str | Path | None,
    *,
    tokenizer: str = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    block_size: int = 64,
    device: torch.device | str = "cpu",
) -> TextData:
    """Read, split, train the tokenizer on the training part, and encode both parts."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    text = read_text(path, tokenizer=tokenizer)
    cut = round(len(text) * (1.0 - val_fraction))
    train_text, val_text = text[:cut], text[cut:]
    del text  # the slices are copies: the whole need not stay beside them and the ids
    tokens = train_tokenizer(tokenizer, train_text, vocab_size=vocab_size)
    train = torch.from_numpy(tokens.encode(train_text)).to(device)
    val = torch.from_numpy(tokens.encode(val_text)).to(device) if val_fraction > 0 else None
    require_windows("training", train, block_size, "lower --block-size or use a longer --data-file")
    if val is not None:
        require_windows("validation", val, block_size, "raise --val-fraction or lower --block-size")
    return TextData(name="text", path=str(path), tokenizer=tokens, train=train, val=val)


def require_windows(split: str, ids: Tensor, block_size: int, fix: str) -> None:
    if len(ids) < block_size + 1:
        raise ConfigError(f"the {split} split has {len(ids)} tokens, fewer than one window of --block-size "
                          f"{block_size} + 1; {fix}")  # fmt: skip


class RandomWindows:
    """Training batches of random windows, each global batch seeded by (seed, epoch, batch)."""

    exact_resume = True  # epoch(n, start) is a pure function of (seed, n)

    def __init__(
        self, ids: Tensor, block_size: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size < world_size:
            raise ConfigError(f"--batch-size {batch_size} is smaller than the {world_size} processes")
        require_windows("training", ids, block_size, "lower --block-size")
        self.ids, self.block_size, self.batch_size = ids, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.offsets = torch.arange(block_size + 1, device=ids.device)

    def __len__(self) -> int:
        """Batches per epoch: enough windows to hold the training tokens once."""
        return max(1, (len(self.ids) - 1) // (self.block_size * self.batch_size))

    def global_samples(self, start_batch: int, count: int) -> int:
        return count * self.batch_size

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        lo, hi = rank_slice(0, self.batch_size, self.rank, self.world_size)
        generator = torch.Generator(device=self.ids.device)
        for batch in range(start_batch, len(self)):
            generator.manual_seed(batch_seed(self.seed, epoch, batch))
            starts = torch.randint(len(self.ids) - self.block_size, (self.batch_size,), generator=generator,
                                   device=self.ids.device)[lo:hi]  # fmt: skip
            windows = self.ids[starts[:, None] + self.offsets].long()
            yield windows[:, :-1], windows[:, 1:]


def window_pairs(ids: Tensor, block_size: int, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Non-overlapping (input, next-token) windows covering ``ids`` except a tail shorter than a window;
    ``limit``: only the first that many (cut before the int64 copy: the search for a batch size
    needs a few thousand windows, not the whole corpus twice on the device)."""
    count = (len(ids) - 1) // block_size
    count = count if limit is None else min(count, limit)
    inputs = ids[: count * block_size].view(count, block_size).long()
    targets = ids[1 : count * block_size + 1].view(count, block_size).long()
    return inputs, targets


def validation_batches(ids: Tensor, block_size: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> DeviceBatches:
    """The whole split in order, each rank its part (the metric sums are all-reduced)."""
    inputs, targets = window_pairs(ids, block_size)
    return DeviceBatches(inputs, targets, batch_size, shuffle=False, rank=rank, world_size=world_size, lockstep=False)


def bits_per_token(nats: float) -> float:
    return nats / math.log(2)
