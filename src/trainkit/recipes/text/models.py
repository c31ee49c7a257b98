"""Language models over token ids: a GPT-style decoder-only Transformer and a multi-layer LSTM.

Both map (B, T) ids to (B, T, vocab) logits, so the NextToken task, generation and every
experiment treat them alike. Sizes and options come from the run's settings
(``--layers --heads --width --block-size --norm --norm-position --dropout ...``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from trainkit.errors import ConfigError
from trainkit.choices import NORM_POSITIONS, SEQUENCE_MODELS, SEQUENCE_NORMS
from trainkit.distributed import ChannelsLastInput
from trainkit.nn.layers import Dropout, DropPath, check_choice, check_rate
from trainkit.nn.models import drop_path_rates



class TokenBatchNorm(ChannelsLastInput, nn.BatchNorm1d):
    """BatchNorm over the channels of (B, T, C) activations, statistics over batch and time:
    in a causal model it mixes later tokens' statistics into every position (the sequence_norm
    comparison measures what that does)."""


def sequence_norm(kind: str, width: int) -> nn.Module:
    """A norm over the last dimension of (B, T, C) activations; bias-free like the Linear layers."""
    check_choice("norm", kind, SEQUENCE_NORMS)
    if kind == "layer":
        return nn.LayerNorm(width, bias=False)
    if kind == "rms":
        return nn.RMSNorm(width)
    if kind == "batch":
        return TokenBatchNorm(width)
    return nn.Identity()


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t only, through
    ``scaled_dot_product_attention(is_causal=True)`` (PyTorch's fused kernels)."""

    def __init__(self, width: int, heads: int, *, attention_dropout: float, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)  # writes into the residual stream
        self.attention_dropout = attention_dropout
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(x).view(batch, time, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = causal_attention(q, k, v, self.attention_dropout if self.training else 0.0)
        return self.dropout(self.proj(y.transpose(1, 2).reshape(batch, time, width)))


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout: float) -> Tensor:
    """SDPA; under CPU bf16 autocast it runs in fp32, where its backward is several times faster
    than in bf16 while the matmuls around it keep bf16's speed (docs/benchmarks.md, "Text")."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout, is_causal=True)
        return y.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)


class FeedForward(nn.Module):
    """Linear (4x wider) -> GELU -> Linear back: the MLP half of a Transformer block."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 4 * width, bias=False)
        self.proj = nn.Linear(4 * width, width, bias=False)  # writes into the residual stream
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Attention then feed-forward, each a residual branch. ``pre``: x + f(norm(x)), the GPT-2
    placement; ``post``: norm(x + f(x)), the original Transformer's (Xiong et al. 2020)."""

    def __init__(self, width: int, heads: int, *, norm: str, norm_position: str, dropout: float,
                 attention_dropout: float, drop_path: float) -> None:  # fmt: skip
        super().__init__()
        self.pre_norm = norm_position == "pre"
        self.norm1, self.norm2 = sequence_norm(norm, width), sequence_norm(norm, width)
        self.attention = CausalSelfAttention(width, heads, attention_dropout=attention_dropout, dropout=dropout)
        self.feed_forward = FeedForward(width, dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_norm:
            x = x + self.drop_path(self.attention(self.norm1(x)))
            return x + self.drop_path(self.feed_forward(self.norm2(x)))
        x = self.norm1(x + self.drop_path(self.attention(x)))
        return self.norm2(x + self.drop_path(self.feed_forward(x)))


class Transformer(nn.Module):
    """GPT-style decoder: token + learned position embeddings, ``layers`` blocks, a final norm
    (pre-norm only: post-norm blocks end in one), and a head tied to the token embedding."""

    def __init__(
        self, vocab_size: int, block_size: int, *, layers: int = 4, heads: int = 4, width: int = 128,
        norm: str = "layer", norm_position: str = "pre", dropout: float = 0.0, attention_dropout: float = 0.0,
        drop_path: float = 0.0, tie_weights: bool = True, grad_checkpointing: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.grad_checkpointing = grad_checkpointing  # recompute each block in backward: less memory
        for what, value in (("vocab_size", vocab_size), ("block_size", block_size), ("layers", layers),
                            ("heads", heads), ("width", width)):  # fmt: skip
            require_positive(what, value)
        if width % heads:
            raise ConfigError(f"--width {width} must be divisible by --heads {heads} (each head gets width / heads)")
        check_choice("norm position", norm_position, NORM_POSITIONS)
        check_rate("dropout", dropout), check_rate("attention dropout", attention_dropout)
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(block_size, width)
        self.dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(width, heads, norm=norm, norm_position=norm_position, dropout=dropout,
                  attention_dropout=attention_dropout, drop_path=rate)
            for rate in drop_path_rates(drop_path, layers)
        )  # fmt: skip
        self.final_norm = sequence_norm(norm, width) if norm_position == "pre" else nn.Identity()
        self.head = nn.Linear(width, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.token_embedding.weight

    def residual_projections(self) -> list[nn.Linear]:
        """The layers that write into the residual stream: GPT-2 init scales them by 1/sqrt(len)."""
        return [proj for block in self.blocks for proj in (block.attention.proj, block.feed_forward.proj)]

    def residual_stream(self, ids: Tensor) -> list[Tensor]:
        """The residual stream after the embeddings and after each block (signal diagnostics)."""
        x = self.embed(ids)
        stream = [x]
        for block in self.blocks:
            x = block(x)
            stream.append(x)
        return stream

    def embed(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.block_size:
            raise ConfigError(f"a sequence of {ids.shape[1]} tokens is longer than the model's --block-size {self.block_size}")
        return self.dropout(self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]])

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return self.head(self.final_norm(x))


class LSTMLanguageModel(nn.Module):
    """Embedding -> ``layers``-deep ``nn.LSTM`` (dropout between layers) -> optional norm ->
    dropout -> head tied to the embedding. Each window starts from a zero state."""

    def __init__(
        self, vocab_size: int, *, layers: int = 2, width: int = 256, norm: str = "none", dropout: float = 0.0,
        tie_weights: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        for what, value in (("vocab_size", vocab_size), ("layers", layers), ("width", width)):
            require_positive(what, value)
        check_rate("dropout", dropout)
        self.embedding = nn.Embedding(vocab_size, width)
        self.lstm = nn.LSTM(width, width, num_layers=layers, dropout=dropout if layers > 1 else 0.0, batch_first=True)
        self.norm = sequence_norm(norm, width)
        self.dropout = Dropout(dropout)
        self.head = nn.Linear(width, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.embedding.weight

    def forward(self, ids: Tensor) -> Tensor:
        outputs, _ = self.lstm(self.embedding(ids))
        return self.head(self.dropout(self.norm(outputs)))


def build_sequence_model(config: Any, vocab_size: int) -> nn.Module:
    """The run's --model transformer or lstm for ``vocab_size`` tokens (PyTorch's default init;
    the caller applies --init)."""
    if config.model == "transformer":
        return Transformer(
            vocab_size, config.block_size, layers=config.layers, heads=config.heads, width=config.width,
            norm=config.norm, norm_position=config.norm_position, dropout=config.dropout,
            attention_dropout=config.dropout if config.attention_dropout is None else config.attention_dropout,
            drop_path=config.drop_path, tie_weights=config.tie_weights, grad_checkpointing=config.grad_checkpointing,
        )  # fmt: skip
    if config.grad_checkpointing:
        raise ConfigError("--grad-checkpointing is not available for --model lstm (nn.LSTM runs as one fused op)")
    return LSTMLanguageModel(vocab_size, layers=config.layers, width=config.width, norm=config.norm,
                             dropout=config.dropout, tie_weights=config.tie_weights)  # fmt: skip


def require_positive(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--{what.replace('_', '-')} must be a positive integer, got {value!r}")


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters, a tied weight counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def context_window(model: nn.Module) -> int | None:
    """How many tokens of context the model takes at most (None: any, like an LSTM)."""
    return getattr(model, "block_size", None)


def training_flops_per_token(model: nn.Module, block_size: int) -> float:
    """Forward + backward FLOPs per token, approximately: 6 x the weights a token multiplies
    (all but the position table; a tied head counts) plus attention's 12 x layers x width x
    block_size (Kaplan et al. 2020, the estimate nanoGPT's MFU uses)."""
    weights = parameter_count(model)
    if isinstance(model, Transformer):
        weights -= model.position_embedding.weight.numel()
        layers, width = len(model.blocks), model.token_embedding.weight.shape[1]
        return 6.0 * weights + 12.0 * layers * width * block_size
    return 6.0 * weights


__all__ = [
    "NORM_POSITIONS", "SEQUENCE_MODELS", "SEQUENCE_NORMS", "LSTMLanguageModel", "Transformer", "build_sequence_model",
    "context_window",
    "parameter_count", "sequence_norm", "training_flops_per_token",
]  # fmt: skip
