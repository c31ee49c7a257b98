"""Tokenizers: characters, bytes, or byte-level BPE trained on the training split.

Each tokenizer round-trips through ``state_dict()`` (plain strings and numbers), which the
run stores in its checkpoints, so ``trainkit generate`` decodes with exactly the vocabulary
the model was trained on. Encoding a whole file is vectorised with NumPy (char, byte) or done
by Hugging Face ``tokenizers`` (bpe, an optional extra: ``pip install trainkit[text]``). Char
and bpe encode a piece at a time: one pass over a whole file would hold temporaries of many
times its size (docs/reliability.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from trainkit.choices import TOKENIZERS
from trainkit.errors import ConfigError

UNKNOWN_CHAR = "\ufffd"  # what an unknown character decodes to (Unicode's replacement character)
DEFAULT_BPE_VOCAB = 1024
# Characters converted to code points at a time: each costs ~25 bytes of temporaries while it is
# looked up (its utf-32 copy, int64 search positions): 1.6 MB a piece instead of 24x the file.
CODE_POINT_CHUNK = 1 << 16
# Pieces of _chunks() that BPE encodes at once: Hugging Face's Encoding objects hold ~130 bytes
# a token (ids, offsets, token strings, masks), 1 GB for a 21 MB file encoded in one call.
BPE_BATCH = 64
SURROGATE = re.compile(r"[\ud800-\udfff]")


def code_point_chunks(text: str) -> Iterator[tuple[int, np.ndarray]]:
    """(start, code points as uint32) for each piece of ``text`` of CODE_POINT_CHUNK characters:
    a whole file's utf-32 copy would be 4 bytes a character beside the text."""
    for start in range(0, len(text), CODE_POINT_CHUNK):
        yield start, np.frombuffer(text[start : start + CODE_POINT_CHUNK].encode("utf-32-le"), dtype=np.uint32)


def replace_surrogates(text: str) -> str:
    """``text`` with each lone surrogate replaced by UNKNOWN_CHAR. Python keeps the undecodable
    bytes of a command-line argument as surrogates (U+DC80..U+DCFF), which no codec encodes;
    like any character outside a vocabulary, they stand for something the model does not know."""
    return SURROGATE.sub(UNKNOWN_CHAR, text)


class CharTokenizer:
    """One id per character seen in the training text (sorted), and one more for any other
    character: text outside the training split still encodes, as the unknown id."""

    kind = "char"

    def __init__(self, chars: str) -> None:
        if not chars:
            raise ConfigError("a character vocabulary needs at least one character")
        self.chars = "".join(sorted(set(chars)))
        self._codepoints = np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32)
        self.unknown_id = len(self.chars)

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls("".join(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> np.ndarray:
        ids = np.empty(len(text), dtype=np.int32)  # one id a character: Python counts code points
        for start, codepoints in code_point_chunks(text):
            ids[start : start + len(codepoints)] = self._ids(codepoints)
        return ids

    def _ids(self, codepoints: np.ndarray) -> np.ndarray:
        """Each code point's position in the vocabulary, or the unknown id."""
        ids = np.searchsorted(self._codepoints, codepoints)
        np.minimum(ids, len(self._codepoints) - 1, out=ids)
        known = self._codepoints[ids] == codepoints
        return np.where(known, ids, self.unknown_id)

    def decode(self, ids: Any) -> str:
        table = self.chars + UNKNOWN_CHAR
        return "".join(table[i] if 0 <= i < len(table) else UNKNOWN_CHAR for i in map(int, ids))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}


class ByteTokenizer:
    """The 256 byte values of the UTF-8 encoding: no vocabulary to learn, nothing unknown."""

    kind = "byte"
    vocab_size = 256

    @classmethod
    def train(cls, text: str) -> ByteTokenizer:
        return cls()

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Any) -> str:
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


class BpeTokenizer:
    """Byte-level BPE (Hugging Face ``tokenizers``): any text encodes, merges learned from the
    training split up to ``vocab_size`` symbols."""

    kind = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int = DEFAULT_BPE_VOCAB) -> BpeTokenizer:
        tokenizers = require_tokenizers()
        tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size, show_progress=False,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        )  # fmt: skip
        tokenizer.train_from_iterator(_chunks(text), trainer=trainer)
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        chunks = _chunks(text)  # whole lines stay whole; each batch is encoded in parallel
        batches = (self.tokenizer.encode_batch(chunks[i : i + BPE_BATCH]) for i in range(0, len(chunks), BPE_BATCH))
        return np.fromiter((i for batch in batches for e in batch for i in e.ids), dtype=np.int32)

    def decode(self, ids: Any) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "json": self.tokenizer.to_str()}


def _chunks(text: str, lines: int = 256) -> list[str]:
    """The text in pieces of whole lines (newlines kept): what BPE trains and encodes in parallel."""
    parts = text.splitlines(keepends=True)
    return ["".join(parts[i : i + lines]) for i in range(0, len(parts), lines)]


def require_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("--tokenizer bpe needs Hugging Face tokenizers: pip install 'trainkit[text]'") from None
    return tokenizers


Tokenizer = CharTokenizer | ByteTokenizer | BpeTokenizer


def train_tokenizer(kind: str, text: str, *, vocab_size: int | None = None) -> Tokenizer:
    """The ``kind`` tokenizer learned from ``text`` (the training split only)."""
    if kind not in TOKENIZERS:
        raise ConfigError(f"--tokenizer must be one of {', '.join(TOKENIZERS)}; got {kind!r}")
    if vocab_size is not None and kind != "bpe":
        raise ConfigError(f"--vocab-size sets the size of a bpe vocabulary; --tokenizer {kind} has its own")
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "byte":
        return ByteTokenizer()
    return BpeTokenizer.train(text, vocab_size or DEFAULT_BPE_VOCAB)


def tokenizer_from_state(state: Any) -> Tokenizer:
    """The tokenizer a checkpoint stored (``state_dict()``); anything else is a one-line error."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "char" and isinstance(state.get("chars"), str):
        return CharTokenizer(state["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe" and isinstance(state.get("json"), str):
        return BpeTokenizer(require_tokenizers().Tokenizer.from_str(state["json"]))
    raise ConfigError(f"the stored tokenizer is not one trainkit wrote ({str(state)[:60]!r}); is this a text run's checkpoint?")
