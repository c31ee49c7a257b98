"""Sampling text from a trained language model: temperature, top-k, a seeded generator.

The same prompt, settings and seed give the same text (on the same device and torch build):
every draw comes from one ``torch.Generator`` seeded by ``seed``, never the global RNG.
"""

from __future__ import annotations

import torch
from torch import nn

from trainkit.errors import ConfigError
from trainkit.recipes.text.models import context_window
from trainkit.recipes.text.tokenizers import Tokenizer, replace_surrogates

DEFAULT_CONTEXT = 256  # tokens an LSTM sees per step when no --block-size is given


def check_sampling(tokens: int, temperature: float, top_k: int | None) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ConfigError(f"--tokens must be an integer >= 0, got {tokens!r}")
    if not temperature > 0 or temperature == float("inf"):
        raise ConfigError(f"--temperature must be a positive finite number, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"--top-k must be a positive integer (or omitted for the whole vocabulary), got {top_k!r}")


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer: Tokenizer, prompt: str, *, tokens: int = 200, temperature: float = 1.0,
    top_k: int | None = None, seed: int = 0, context: int | None = None,
) -> str:  # fmt: skip
    """The prompt followed by ``tokens`` sampled tokens, decoded.

    Each step sees the last ``context`` tokens: pass the run's --block-size, the window length
    the model trained on (a Transformer's own block size is the default). Undecodable bytes of a
    command-line prompt (surrogates) are unknown characters, in the prompt and in the text returned.
    """
    check_sampling(tokens, temperature, top_k)
    if not prompt:
        raise ConfigError("--prompt must be non-empty text (e.g. a newline) for the model to continue")
    prompt = replace_surrogates(prompt)
    device = next(model.parameters()).device
    context = context or context_window(model) or DEFAULT_CONTEXT
    ids = torch.as_tensor(tokenizer.encode(prompt), dtype=torch.long, device=device)[None]
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for _ in range(tokens):
            logits = model(ids[:, -context:])[0, -1].float() / temperature
            if top_k is not None and top_k < logits.numel():
                cutoff = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < cutoff, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            ids = torch.cat([ids, next_id[None]], dim=1)
    finally:
        model.train(was_training)
    return prompt + tokenizer.decode(ids[0, -tokens:].tolist()) if tokens else prompt
