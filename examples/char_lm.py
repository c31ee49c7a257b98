"""A character-level language model on a text file: next-token training, perplexity, sampling.

What it shows
    * a Dataset of (input ids, next-char ids) windows of ``--block`` characters;
    * ``NextToken()``: per-token cross-entropy over (batch, time, vocab) logits, with
      ``perplexity`` (= exp(loss)) and ``token_accuracy`` in the history and in ``evaluate``;
    * a step budget (``max_steps``) with validation every ``val_every_steps`` steps, instead of epochs;
    * ``generate(model, prompt, n)``: sampling text from the trained model.

The model is an embedding, one ``nn.GRU`` layer and a linear head: on a CPU it reaches a
lower loss in the same wall time than a small causal Transformer (measured while writing
this example: about 1.5 vs 1.75 nats after 4 s). The final validation loss is printed next
to the unigram entropy of the training text, the loss of a model that ignores context: a
loss below it means the model learned something from the preceding characters.

Run (from the repository root; the default text is ../shared/datasets/text/kjv.txt)::

    .venv/bin/python examples/char_lm.py
    .venv/bin/python examples/char_lm.py --chars 40000 --max-steps 60      # quick
    .venv/bin/python examples/char_lm.py --text my.txt --prompt "Once upon"

The last line printed is JSON: validation loss, perplexity and token accuracy, the unigram
entropy (nats per character) and a generated sample.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from trainkit.config.schema import TrainConfig
from trainkit.tasks.kinds import NextToken
from trainkit import Trainer

DEFAULT_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "text" / "kjv.txt"


class CharWindows(Dataset):
    """Non-overlapping windows of ``block`` ids; the target is the same window shifted by one."""

    def __init__(self, ids: Tensor, block: int) -> None:
        if len(ids) <= block:
            raise ValueError(f"the text has {len(ids)} characters, fewer than one window of {block} + 1")
        self.ids, self.block = ids, block

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.block

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = index * self.block
        return self.ids[start : start + self.block], self.ids[start + 1 : start + self.block + 1]


class CharGRU(nn.Module):
    """Embedding -> GRU -> logits over the characters. ``chars`` (the vocabulary) travels with
    the model, so ``generate`` can encode a prompt and decode samples."""

    def __init__(self, chars: list[str], embed: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.chars = list(chars)
        self.embed = nn.Embedding(len(chars), embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, len(chars))

    def run(self, ids: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, T) ids -> ((B, T, vocab) logits, GRU state to continue from)."""
        outputs, state = self.gru(self.embed(ids), state)
        return self.head(outputs), state

    def forward(self, ids: Tensor) -> Tensor:
        return self.run(ids)[0]


def unigram_entropy(text: str) -> float:
    """Entropy of the character frequencies, in nats: the loss of the best context-free model."""
    total = len(text)
    return -sum(n / total * math.log(n / total) for n in Counter(text).values())


@torch.no_grad()
def generate(model: CharGRU, prompt: str, n: int, *, temperature: float = 0.8, seed: int = 0) -> str:
    """The prompt followed by ``n`` sampled characters (one GRU step per character)."""
    index = {char: i for i, char in enumerate(model.chars)}
    unknown = sorted(set(prompt) - set(index))
    if not prompt or unknown:
        raise ValueError(f"the prompt must be non-empty text of the training characters; unknown: {unknown}")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    logits, state = model.run(torch.tensor([[index[c] for c in prompt]]))
    sampled = []
    for _ in range(n):
        probabilities = torch.softmax(logits[0, -1] / temperature, dim=-1)
        next_id = torch.multinomial(probabilities, 1, generator=generator)
        sampled.append(model.chars[int(next_id)])
        logits, state = model.run(next_id.view(1, 1), state)
    return prompt + "".join(sampled)


def load_text(path: Path, chars: int) -> str:
    """The first ``chars`` characters of a UTF-8 text file."""
    with open(path, encoding="utf-8") as file:
        return file.read(chars)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--chars", type=int, default=300_000, help="use only the first N characters")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="the end of the text, held out")
    parser.add_argument("--block", type=int, default=64, help="characters per training window")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--max-steps", type=int, default=600, help="optimizer steps to train")
    parser.add_argument("--val-every", type=int, default=200, help="validate every N steps (0: epoch ends only)")
    parser.add_argument("--prompt", default="And God said")
    parser.add_argument("--sample-chars", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    text = load_text(args.text, args.chars)
    chars = sorted(set(text))
    index = {char: i for i, char in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text])
    cut = round(len(text) * (1 - args.val_fraction))
    train, val = CharWindows(ids[:cut], args.block), CharWindows(ids[cut:], args.block)
    torch.manual_seed(args.seed)
    model = CharGRU(chars, hidden=args.hidden)
    config = TrainConfig(max_steps=args.max_steps, val_every_steps=args.val_every, batch_size=args.batch_size,
                         lr=args.lr, device="cpu", seed=args.seed)  # fmt: skip
    trainer = Trainer(model, config, task=NextToken())
    history = trainer.fit(train, val)
    measured = trainer.evaluate(val)
    result = {
        "val_loss": measured["loss"],
        "val_perplexity": measured["perplexity"],
        "val_token_accuracy": measured["token_accuracy"],
        "final_train_loss": history[-1]["train_loss"],  # the last row's steps, in training mode
        "unigram_entropy": unigram_entropy(text[:cut]),
        "vocab": len(chars),
        "optimizer_steps": trainer.state.global_step,
        "history_rows": len(history),
        "sample": generate(model, args.prompt, args.sample_chars, seed=args.seed),
    }
    print(f"loss (nats/char): val {result['val_loss']:.3f}, final train {result['final_train_loss']:.3f}, "
          f"unigram entropy of the training text {result['unigram_entropy']:.3f}")
    print(result["sample"])
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
