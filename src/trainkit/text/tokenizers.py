"""Tokenizers: characters, bytes, or byte-level BPE trained on the training split.

Each tokenizer round-trips through ``state_dict()`` (plain strings and numbers), which the
run stores in its checkpoints, so ``trainkit generate`` decodes with exactly the vocabulary
the model was trained on. Encoding a whole file is vectorised with NumPy (char, byte) or done
by Hugging Face ``tokenizers`` (bpe, an optional extra: ``pip install trainkit[text]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainkit.errors import ConfigError

TOKENIZERS = ("char", "byte", "bpe")
UNKNOWN_CHAR = "\ufffd"  # what an unknown character decodes to (Unicode's replacement character)
DEFAULT_BPE_VOCAB = 1024


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
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codepoints, codepoints)
        ids = np.minimum(ids, len(self._codepoints) - 1)
        known = self._codepoints[ids] == codepoints
        return np.where(known, ids, self.unknown_id).astype(np.int32)

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
        encoded = self.tokenizer.encode_batch(_chunks(text))  # in parallel, and whole lines stay whole
        return np.fromiter((i for e in encoded for i in e.ids), dtype=np.int32)

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
