"""Run configuration as explicit data.

One flat dataclass holds everything a run needs. The CLI builds it from a config file
(TOML or YAML) and overrides it with the flags given; the Python API builds it directly.
``validate`` turns nonsense (a negative learning rate, dropout of 1.5) into a one-line
``ConfigError`` before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainkit.data import DATASET_NAMES
from trainkit.distributed import STRATEGIES
from trainkit.errors import ConfigError
from trainkit.init import INIT_SCHEMES
from trainkit.layers import ACTIVATIONS, NORMS
from trainkit.models import MODEL_NAMES

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = (
    "constant", "step", "multistep", "exponential", "cosine", "warmup_cosine", "linear",
    "onecycle", "cosine_restarts", "plateau",
)  # fmt: skip
ANNEALS = ("cos", "linear")
PRECISIONS = ("fp32", "bf16", "fp16")
MODES = ("min", "max")
NONFINITE_POLICIES = ("raise", "skip", "rollback")
SAVE_ERROR_POLICIES = ("continue", "stop")

# Defaults that depend on the model: the CNN trains fewer, slower epochs and needs
# shift augmentation to get past 99.5%; the MLP does best without it in a short budget.
MODEL_RECIPES: dict[str, dict[str, Any]] = {
    "mlp": {"epochs": 20, "augment_shift": 0, "channels_last": False},
    "residual_mlp": {"epochs": 20, "augment_shift": 0, "channels_last": False},
    # channels_last: measured 1.8-2.1x faster CNN steps on CPU (docs/benchmarks.md)
    "cnn": {"epochs": 12, "augment_shift": 2, "channels_last": True},
}


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults are the production MNIST recipe."""

    # data
    dataset: str = "mnist"
    data_dir: str | None = None
    val_size: int = 5000
    train_size: int | None = None  # use only the first N training images (experiments on a budget)
    augment_shift: int | None = None  # None: the model's recipe (MODEL_RECIPES)
    # model
    model: str = "mlp"
    norm: str = "batch"
    dropout: float = 0.3
    drop_path: float = 0.0  # stochastic depth of residual_mlp's blocks
    norm_after_dropout: bool = False  # MLP block order Linear-act-Dropout-norm instead of Linear-norm-act-Dropout
    activation: str = "relu"
    init: str = "he"
    # optimisation
    optimizer: str = "adamw"
    lr: float | str = 1e-3  # or "auto": run the LR finder first and use its suggestion
    weight_decay: float = 0.01
    momentum: float = 0.9
    batch_size: int | str = 128  # or "auto": the largest power of two that fits (trainkit.memory)
    memory_budget: float | None = None  # GiB a CPU training step may use for --batch-size auto; None: half of free RAM
    eval_batch_size: int = 1024
    epochs: int | None = None  # None: the model's recipe (MODEL_RECIPES)
    schedule: str = "warmup_cosine"
    warmup: float | None = None  # epochs of linear warmup before any schedule; None: 1 for warmup_cosine, else 0
    min_lr: float = 0.0  # floor of cosine / linear / cosine_restarts / onecycle / plateau
    step_epochs: float | None = None  # step: epochs between decays (None: a third of the run)
    gamma: float = 0.1  # step / multistep decay factor
    milestones: list[float] = field(default_factory=list)  # multistep: epochs (empty: 50% and 75%)
    pct_start: float = 0.3  # onecycle: fraction of the run spent rising
    anneal: str = "cos"  # onecycle: cos or linear
    restart_epochs: float | None = None  # cosine_restarts: first cycle length (None: a quarter of the run)
    restart_mult: int = 1  # cosine_restarts: cycle length multiplier
    plateau_patience: int = 2  # plateau: epochs without improvement of --monitor before lowering
    plateau_factor: float = 0.1  # plateau: lr multiplier
    clip_norm: float | None = 1.0
    clip_value: float | None = None
    accumulate: int = 1
    precision: str = "fp32"
    # speed (each measured in benchmarks/; on only where it wins)
    channels_last: bool | None = None  # NHWC memory format for conv models; None: the model's recipe
    compile: bool = False  # torch.compile the model (slower on the MNIST models on CPU, see benchmarks)
    threads: int | None = None  # torch intra-op threads; None: torch's default (one per core)
    grad_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1 more forward
    # early stopping and checkpoints
    patience: int = 5  # 0 turns early stopping off
    min_delta: float = 0.0
    monitor: str = "val_loss"
    monitor_mode: str = "min"
    keep_checkpoints: int = 3  # newest checkpoint files kept (epoch ends and mid-epoch saves)
    keep_every_epochs: int = 0  # also keep every K-th epoch's checkpoint; 0 = off
    checkpoint_every_steps: int = 0  # mid-epoch checkpoints every N optimizer steps; 0 = off
    on_save_error: str = "continue"  # a failed save is reported; "stop" ends training instead
    # non-finite losses
    on_nonfinite: str = "raise"  # raise | skip (drop the step) | rollback (reload, lower lr)
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    # run
    seed: int = 0
    device: str = "auto"
    strategy: str = "auto"  # single | ddp (one process per device under torchrun) | auto: ddp when WORLD_SIZE > 1
    out: str | None = None
    hidden: list[int] = field(default_factory=lambda: [256, 128])

    def resolved(self) -> TrainConfig:
        """A copy with model-dependent defaults filled in and values validated."""
        recipe = MODEL_RECIPES.get(self.model, MODEL_RECIPES["mlp"])
        filled = dataclasses.replace(
            self,
            epochs=recipe["epochs"] if self.epochs is None else self.epochs,
            augment_shift=recipe["augment_shift"] if self.augment_shift is None else self.augment_shift,
            channels_last=recipe["channels_last"] if self.channels_last is None else self.channels_last,
            warmup=(1.0 if self.schedule == "warmup_cosine" else 0.0) if self.warmup is None else self.warmup,
            hidden=list(self.hidden),
            milestones=list(self.milestones),
        )
        filled.validate()
        return filled

    def validate(self) -> None:
        """Check every value before any work starts (data loading, model building)."""
        _require_choice("dataset", self.dataset, DATASET_NAMES)
        _require_choice("model", self.model, MODEL_NAMES)
        _require_choice("norm", self.norm, NORMS)
        _require_choice("activation", self.activation, ACTIVATIONS)
        _require_choice("init", self.init, INIT_SCHEMES)
        _require_choice("optimizer", self.optimizer, OPTIMIZERS)
        _require_choice("schedule", self.schedule, SCHEDULES)
        _require_choice("precision", self.precision, PRECISIONS)
        _require_choice("monitor-mode", self.monitor_mode, MODES)
        _require_choice("on-nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        _require_choice("on-save-error", self.on_save_error, SAVE_ERROR_POLICIES)
        _require_choice("strategy", self.strategy, STRATEGIES)
        if self.lr != "auto":
            _require_positive("lr", self.lr)
        _require_choice("anneal", self.anneal, ANNEALS)
        _require_non_negative("min-lr", self.min_lr)
        for name in ("gamma", "plateau_factor"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in (0, 1), got {getattr(self, name)}")
        if not 0.0 < self.pct_start < 1.0:
            raise ConfigError(f"--pct-start must be in (0, 1), got {self.pct_start}")
        for name in ("step_epochs", "restart_epochs"):
            if getattr(self, name) is not None:
                _require_positive(name.replace("_", "-"), getattr(self, name))
        _require_non_negative("weight-decay", self.weight_decay)
        _require_non_negative("momentum", self.momentum)
        if self.warmup is not None:
            _require_non_negative("warmup", self.warmup)
        _require_non_negative("min-delta", self.min_delta)
        if self.batch_size != "auto":
            _require_batch_size(self.batch_size)
        if self.memory_budget is not None:
            _require_positive("memory-budget", self.memory_budget)
        for name in ("eval_batch_size", "accumulate", "keep_checkpoints", "restart_mult"):
            _require_int_at_least(name, getattr(self, name), 1)
        for name in ("patience", "val_size", "augment_shift", "seed", "keep_every_epochs",
                     "checkpoint_every_steps", "max_rollbacks", "plateau_patience"):  # fmt: skip
            _require_int_at_least(name, getattr(self, name), 0)
        if self.epochs is not None:
            _require_int_at_least("epochs", self.epochs, 1)
        if self.val_size == 0 and self.patience > 0 and self.monitor.startswith("val_"):
            raise ConfigError(
                f"--val-size 0 leaves no validation data, but early stopping monitors {self.monitor}; "
                f"pass --patience 0 or --monitor train_loss"
            )
        if self.threads is not None:
            _require_int_at_least("threads", self.threads, 1)
        if not 0.0 < self.rollback_lr_factor < 1.0:
            raise ConfigError(f"--rollback-lr-factor must be in (0, 1), got {self.rollback_lr_factor}")
        if self.train_size is not None:
            _require_int_at_least("train_size", self.train_size, 1)
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.clip_norm is not None:
            _require_positive("clip-norm", self.clip_norm)
        if self.clip_value is not None:
            _require_positive("clip-value", self.clip_value)
        if not self.hidden or any(not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ConfigError(f"hidden must be a list of positive layer widths, got {self.hidden}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a config from a mapping, rejecting keys that are not config fields."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    normalised = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(normalised) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting(s) {', '.join(unknown)}; valid settings: {', '.join(sorted(known))}"
        )
    return TrainConfig(**normalised)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON config file into a plain mapping of settings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            values = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: use a .toml, .yaml/.yml or .json file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(values).__name__}")
    return values


def _require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--{name} must be one of {', '.join(choices)}; got {value!r}")


def _require_batch_size(value: int | str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--batch-size must be an integer >= 1 or 'auto', got {value!r}")


def _require_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--{name} must be a positive finite number, got {value}")


def _require_non_negative(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"--{name} must be a finite number >= 0, got {value}")


def _require_int_at_least(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value}")
