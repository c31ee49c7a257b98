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
import os
import re
import reprlib
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import torch
import yaml

from trainkit.callbacks import monitor_direction
from trainkit.devices import fast_bf16, require_device, resolve_device
from trainkit.distributed import STRATEGIES
from trainkit.errors import ConfigError
from trainkit.loggers import check_loggers
from trainkit.optim import LR_SCALINGS
from trainkit.tasks import SMOOTHED_TASKS, TASKS, build_task
from trainkit.choices import DATASET_NAMES, NORM_POSITIONS, SEQUENCE_MODELS, SEQUENCE_NORMS, TOKENIZERS, TTA_MODES

TASK_NAMES = tuple(TASKS)

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = (
    "constant", "step", "multistep", "exponential", "cosine", "warmup_cosine", "linear",
    "onecycle", "cosine_restarts", "plateau",
)  # fmt: skip
ANNEALS = ("cos", "linear")
PRECISIONS = ("fp32", "bf16", "fp16")
MODES = ("auto", "min", "max")
NONFINITE_POLICIES = ("raise", "skip", "rollback")
SAVE_ERROR_POLICIES = ("continue", "stop")
MAX_SEED = 2**32 - 1  # NumPy's seed range; torch and random accept it too
MIN_BPE_VOCAB, MAX_VOCAB = 257, 1_000_000  # a byte-level BPE starts from the 256 bytes
# Metrics every run logs besides the task's train_<metric> / val_<metric> (trainkit.tasks).
LOOP_MONITORABLE = ("grad_norm", "clip_fraction")
# Fields whose command-line flag is not simply the field name with dashes.
FLAG_NAMES = {"augment_shift": "--augment"}
# Settings a config file turns off with 0, as their flags do (TOML has no null).
OFF_WHEN_ZERO = ("clip_norm", "clip_value")
# The part of an epoch's optimizer steps that --on-nonfinite skip may drop by default.
DEFAULT_SKIP_FRACTION = 0.1
# The optimizer multiplies settings together in the parameters' float32 (lr x weight decay, lr /
# Adam's bias correction, lr x --lr-scaling's ratio): capping each number at sqrt(float32's max)
# keeps any product of two of them finite. --lr 3e38 is finite in float32 yet overflows AdamW's step.
MAX_FLOAT_SETTING = math.sqrt(torch.finfo(torch.float32).max)  # about 1.8e19
# What a config file may expand to: a few hundred bytes of YAML anchors can name gigabytes.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000  # every table, list and scalar counts
MAX_CONFIG_DEPTH = 32
MAX_SHOWN_CHARS = 80  # a value quoted in an error message is cut to this

# What a model trainkit does not know (the user's own) gets: plain loop defaults.
LOOP_DEFAULTS: dict[str, Any] = {"epochs": 10, "augment_shift": 0, "channels_last": False}
# Defaults that depend on the model: the CNN trains fewer, slower epochs and needs
# shift augmentation to get past 99.5%; the MLP does best without it in a short budget.
MODEL_RECIPES: dict[str, dict[str, Any]] = {
    "mlp": {"epochs": 20, "augment_shift": 0, "channels_last": False},
    "residual_mlp": {"epochs": 20, "augment_shift": 0, "channels_last": False},
    # channels_last: measured 1.8-2.1x faster CNN steps on CPU (docs/benchmarks.md)
    "cnn": {"epochs": 12, "augment_shift": 2, "channels_last": True},
}

# --dataset text: the settings its runs default to, per model (what the user sets wins). The
# Transformer's are the recipe measured against nanoGPT (docs/benchmarks.md, "Text");
# any other model (the LSTM, a user's MODULE:FUNCTION) gets the loop part.
TEXT_DEFAULT_MODEL = "transformer"
TEXT_LOOP_RECIPE: dict[str, Any] = {
    "task": "next_token", "max_steps": 1500, "batch_size": 12, "eval_batch_size": 256, "lr": 3e-3, "min_lr": 1e-4,
    "warmup_steps": 75, "weight_decay": 0.1, "clip_norm": 1.0, "patience": 0, "dropout": 0.0, "fused_optimizer": True,
}  # fmt: skip
TEXT_RECIPES: dict[str, dict[str, Any]] = {
    "transformer": {**TEXT_LOOP_RECIPE, "norm": "layer", "init": "gpt", "layers": 4, "heads": 4, "width": 128},
    "lstm": {**TEXT_LOOP_RECIPE, "norm": "none", "init": "default", "layers": 2, "width": 256},
}


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults are the production MNIST recipe.

    The Trainer reads only the loop settings (``LOOP_FIELDS``); the rest describe the recipe
    (dataset, model and their options) that ``train_run`` and the CLI build.
    """

    # data: a trainkit dataset name, or MODULE:FUNCTION returning (train, val[, test]) datasets
    dataset: str = "mnist"
    dataset_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a MODULE:FUNCTION dataset
    num_workers: int = 0  # DataLoader worker processes for Dataset inputs (0: load in the training process)
    data_dir: str | os.PathLike | None = None
    val_size: int = 5000
    train_size: int | None = None  # use only the first N training images (experiments on a budget)
    augment_shift: int | None = None  # None: the model's recipe (MODEL_RECIPES)
    # model: a trainkit model name, or MODULE:FUNCTION returning an nn.Module
    model: str = "mlp"
    model_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a MODULE:FUNCTION model
    task: str = "classification"  # classification | multilabel | regression | next_token (trainkit.tasks)
    metrics: list[str] | None = None  # built-in metric names; None: the task's own
    loss: str | None = None  # a torch.nn loss class name (e.g. HuberLoss) instead of the task's
    norm: str = "batch"
    dropout: float = 0.3
    drop_path: float = 0.0  # stochastic depth of residual_mlp's blocks
    norm_after_dropout: bool = False  # MLP block order Linear-act-Dropout-norm instead of Linear-norm-act-Dropout
    activation: str = "relu"
    init: str = "he"
    # optimisation
    optimizer: str = "adamw"
    fused_optimizer: bool = False  # AdamW's fused kernel (the text recipe turns it on: measured faster there)
    lr: float | Literal["auto"] = 1e-3  # or "auto": run the LR finder first and use its suggestion
    weight_decay: float = 0.01
    momentum: float = 0.9
    batch_size: int | Literal["auto"] = 128  # or "auto": the largest power of two that fits (trainkit.memory)
    memory_budget: float | None = None  # GiB a CPU training step may use for --batch-size auto; None: half of free RAM
    eval_batch_size: int = 1024
    epochs: int | None = None  # None: the model's recipe (MODEL_RECIPES), or LOOP_DEFAULTS for other models
    max_steps: int | None = None  # optimizer steps to train; when given it is the budget, whatever epochs say
    val_every_steps: int = 0  # also validate (and maybe save best.pt) every N optimizer steps; 0 = epoch ends only
    schedule: str = "warmup_cosine"
    warmup: float | None = None  # epochs of linear warmup before any schedule; None: 1 for warmup_cosine, else 0
    warmup_steps: int | None = None  # linear warmup in optimizer steps instead of --warmup epochs
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
    lr_scaling: str | None = None  # sqrt | linear: scale --lr by the effective batch's ratio to lr_reference_batch
    lr_reference_batch: int = 128  # the effective batch (batch_size x accumulate) that --lr was chosen for
    precision: str = "fp32"
    # weight averaging (trainkit.loop.averaging) and label smoothing
    ema: float | None = None  # decay of an exponential moving average of the weights, updated every step
    swa_start: int | None = None  # stochastic weight averaging: average the weights at each epoch end from this epoch
    swa_lr: float | None = None  # SWA: the lr from swa_start on (annealed to over one epoch); None: the schedule's
    eval_average: bool = True  # validation, best.pt, the test and the exports use the EMA (SWA: the final weights)
    label_smoothing: float = 0.0  # cross-entropy: the target class gets 1 - s, every class s / classes
    tta: str | None = None  # test-time augmentation reported beside the plain test: "shifts" (trainkit.tta)
    # speed (each measured in benchmarks/; on only where it wins)
    channels_last: bool | None = None  # NHWC memory format for conv models; None: the model's recipe
    compile: bool = False  # torch.compile the model (slower on the MNIST models on CPU, see benchmarks)
    threads: int | None = None  # torch intra-op threads; None: torch's default (one per core)
    deterministic: bool = True  # CUDA: deterministic kernels, so a seed fixes the weights (trainkit.devices)
    tf32: bool = False  # CUDA: fp32 matmuls/convolutions in TF32 (faster on Ampere+, not exact)
    grad_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1 more forward
    sync_batchnorm: bool = False  # under DDP/FSDP: BatchNorm statistics of the global batch, not each rank's
    fsdp_offload: bool = False  # --strategy fsdp: parameter shards and optimizer state in CPU memory (CUDA runs)
    fsdp_units: list[str] | None = None  # --strategy fsdp: submodules sharded one by one; None: the blocks (fsdp.shard_units)
    # early stopping and checkpoints
    patience: int = 5  # 0 turns early stopping off
    min_delta: float = 0.0
    monitor: str = "val_loss"
    monitor_mode: str = "auto"  # auto: from the metric's name (loss down, accuracy up)
    keep_checkpoints: int = 3  # newest checkpoint files kept (epoch ends and mid-epoch saves)
    keep_every_epochs: int = 0  # also keep every K-th epoch's checkpoint; 0 = off
    checkpoint_every_steps: int = 0  # mid-epoch checkpoints every N optimizer steps; 0 = off
    on_save_error: str = "continue"  # a failed save is reported; "stop" ends training instead
    # non-finite losses
    on_nonfinite: str = "raise"  # raise | skip (drop the step) | rollback (reload, lower lr)
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    max_skipped_steps: int | None = None  # "skip": more skipped steps than this stop the run; None: 10% of an epoch
    # run
    seed: int = 0
    device: str = "auto"
    strategy: str = "auto"  # single | ddp | fsdp (one process per device under torchrun) | auto: ddp when WORLD_SIZE > 1
    out: str | os.PathLike | None = None
    plots: bool = True  # the loss/metric/lr PNGs at the end: ~1 s, most of it importing matplotlib
    # logging beyond history.csv (trainkit.loggers): continued into the same logged run on --resume
    logger: list[str] = field(default_factory=lambda: ["csv"])  # csv (always on), tensorboard, mlflow
    log_every_steps: int = 50  # per-step loss, lr, gradient norm and clip rate every N optimizer steps
    mlflow_uri: str | None = None  # None: sqlite:///<the run folder's parent>/mlflow.db
    mlflow_experiment: str = "trainkit"
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    channels: list[int] | None = None  # cnn: output channels of each conv stage; None: 32,64,128
    # text (--dataset text; defaults: TEXT_RECIPES)
    data_file: str | os.PathLike | None = None  # any UTF-8 text file
    tokenizer: str = "char"  # char | byte | bpe (trained on the training split)
    vocab_size: int | None = None  # bpe vocabulary size; None: 1024
    val_fraction: float = 0.1  # the end of the text, held out for validation
    block_size: int = 64  # tokens per training window (and the Transformer's context)
    # sequence models (--model transformer | lstm)
    layers: int = 4
    heads: int = 4  # transformer: attention heads (width must divide by it)
    width: int = 128  # embedding / residual stream / LSTM hidden size
    norm_position: str = "pre"  # transformer: pre (GPT-2) or post (the original Transformer) norm
    attention_dropout: float | None = None  # transformer: dropout on attention weights; None: --dropout
    tie_weights: bool = True  # the output head shares the token embedding's weights

    def resolved(self, *, loop_only: bool = False) -> TrainConfig:
        """A copy with model-dependent defaults filled in and values validated.

        ``loop_only`` (the Trainer): the model is the user's, so the recipe fields are neither
        checked nor used for defaults; unset epochs etc. get ``LOOP_DEFAULTS``.
        """
        check_field_types(vars(self))
        recipe = LOOP_DEFAULTS if loop_only else MODEL_RECIPES.get(self.model, LOOP_DEFAULTS)
        # max_steps alone is the budget: epochs stays None and the Trainer derives it from the data
        epochs = recipe["epochs"] if self.epochs is None and self.max_steps is None else self.epochs
        filled = dataclasses.replace(
            self,
            epochs=epochs,
            augment_shift=recipe["augment_shift"] if self.augment_shift is None else self.augment_shift,
            channels_last=recipe["channels_last"] if self.channels_last is None else self.channels_last,
            warmup=default_warmup(self.schedule, epochs) if self.warmup is None and epochs and self.warmup_steps is None
            else self.warmup,
            attention_dropout=self.dropout if self.attention_dropout is None else self.attention_dropout,
            hidden=list(self.hidden),
            channels=None if self.channels is None else list(self.channels),
            milestones=list(self.milestones),
            metrics=None if self.metrics is None else list(self.metrics),
            model_args=dict(self.model_args),
            dataset_args=dict(self.dataset_args),
            data_dir=None if self.data_dir is None else os.fspath(self.data_dir),
            data_file=None if self.data_file is None else os.fspath(self.data_file),
            out=None if self.out is None else os.fspath(self.out),
        )
        filled.validate(loop_only=loop_only)
        filled.monitor_mode = filled.resolved_monitor_mode()
        return filled

    def resolved_monitor_mode(self) -> str:
        if self.monitor_mode != "auto":
            return self.monitor_mode
        try:
            return monitor_direction(self.monitor)
        except ConfigError:
            raise ConfigError(f"cannot tell whether --monitor {self.monitor} should go up or down: "
                              f"pass --monitor-mode min or max") from None  # fmt: skip

    def loop_settings(self) -> dict[str, Any]:
        """The settings the Trainer uses (what its checkpoints record): no dataset or model options."""
        values = self.to_dict()
        return {name: values[name] for name in LOOP_FIELDS}

    def validate(self, *, loop_only: bool = False) -> None:
        """Check every value before any work starts (data loading, model building, writing files)."""
        check_field_types(vars(self))
        self._validate_choices(loop_only)
        self._validate_numbers()
        self._validate_schedule()
        self._validate_monitor(loop_only)
        self._validate_averaging(loop_only)
        self._validate_sharding()

    def _validate_sharding(self) -> None:
        """What --strategy fsdp does not (yet) combine with, refused before any work (docs/scaling.md)."""
        if self.strategy != "fsdp":
            if self.fsdp_offload or self.fsdp_units:
                flag = "--fsdp-offload" if self.fsdp_offload else "--fsdp-units"
                raise ConfigError(f"{flag} applies to --strategy fsdp; add --strategy fsdp or drop it")
            return
        for name, on in (("ema", self.ema is not None), ("swa_start", self.swa_start is not None),
                         ("compile", self.compile)):  # fmt: skip
            if on:
                raise ConfigError(f"{flag_name(name)} is not supported with --strategy fsdp; use --strategy ddp "
                                  f"or drop {flag_name(name)}")  # fmt: skip

    def _validate_choices(self, loop_only: bool) -> None:
        if not loop_only:
            self._validate_recipe_choices()
        for name, choices in (
            ("task", TASK_NAMES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("precision", PRECISIONS),
            ("monitor_mode", MODES), ("on_nonfinite", NONFINITE_POLICIES), ("on_save_error", SAVE_ERROR_POLICIES),
            ("strategy", STRATEGIES), ("anneal", ANNEALS),
        ):  # fmt: skip
            _require_choice(name, getattr(self, name), choices)
        for name, choices in (("lr_scaling", tuple(LR_SCALINGS)), ("tta", TTA_MODES)):
            if getattr(self, name) is not None:
                _require_choice(name, getattr(self, name), choices)
        if self.fused_optimizer and self.optimizer != "adamw":
            raise ConfigError(f"--fused-optimizer is AdamW's fused kernel; --optimizer {self.optimizer} has none here")
        require_device(self.device)

    def _validate_recipe_choices(self) -> None:
        """The MNIST recipe's names, imported here only: the Trainer (loop_only) never needs the recipe."""
        from trainkit.init import INIT_SCHEMES
        from trainkit.layers import ACTIVATIONS, NORMS
        from trainkit.models import MODEL_NAMES

        for name, names in (("dataset", (*DATASET_NAMES, "text")), ("model", (*MODEL_NAMES, *SEQUENCE_MODELS))):
            if not is_factory_path(getattr(self, name)):
                _require_choice(name, getattr(self, name), names, "or MODULE:FUNCTION for your own")
        sequence = self.model in SEQUENCE_MODELS
        if self.channels is not None and self.model != "cnn":
            raise ConfigError(f"--channels sets the cnn's conv stages; --model {self.model} has none (MLPs: --hidden)")
        for name, choices in (("norm", SEQUENCE_NORMS if sequence else NORMS), ("activation", ACTIVATIONS),
                              ("init", INIT_SCHEMES), ("tokenizer", TOKENIZERS), ("norm_position", NORM_POSITIONS)):  # fmt: skip
            _require_choice(name, getattr(self, name), choices)
        self._validate_factory_args()
        self._validate_text_recipe(sequence)
        check_loggers(self.logger)

    def _validate_factory_args(self) -> None:
        """dataset_args / model_args go to a MODULE:FUNCTION factory: a built-in would ignore them silently."""
        for owner in ("dataset", "model"):
            args, name = getattr(self, f"{owner}_args"), getattr(self, owner)
            if args and not is_factory_path(name):
                raise ConfigError(f"--{owner}-arg / {owner}_args ({_shorten(', '.join(args))}) are keyword arguments "
                                  f"of a MODULE:FUNCTION {owner}; the built-in --{owner} {name} ignores them: drop them")  # fmt: skip

    def _validate_text_recipe(self, sequence_model: bool) -> None:
        """Text needs a language model and the next-token task; the sequence models need text."""
        text, user_model = self.dataset == "text", is_factory_path(self.model)
        if text and not (sequence_model or user_model):
            raise ConfigError(f"--model {self.model} is an image model; --dataset text trains "
                              f"transformer or lstm (or your own MODULE:FUNCTION)")  # fmt: skip
        if sequence_model and not text:
            raise ConfigError(f"--model {self.model} is a language model; give it text: --dataset text --data-file FILE")
        if text and self.task != "next_token":
            raise ConfigError(f"--dataset text trains the next_token task, not --task {self.task}")
        if self.model == "transformer" and self.width % self.heads:
            raise ConfigError(f"--width {self.width} must be divisible by --heads {self.heads} "
                              f"(each head gets width / heads channels)")  # fmt: skip
        if self.vocab_size is not None and self.tokenizer != "bpe":
            raise ConfigError(f"--vocab-size sets the bpe vocabulary; --tokenizer {self.tokenizer} has its own")
        if self.vocab_size is not None and not MIN_BPE_VOCAB <= self.vocab_size <= MAX_VOCAB:
            raise ConfigError(f"--vocab-size must be in {MIN_BPE_VOCAB}..{MAX_VOCAB} (a byte-level BPE starts "
                              f"from 256 symbols), got {self.vocab_size}")  # fmt: skip

    def _validate_numbers(self) -> None:
        if self.lr != "auto":
            _require_positive("lr", self.lr)
        for name in ("min_lr", "weight_decay", "min_delta"):
            _require_non_negative(name, getattr(self, name))
        for name in ("gamma", "plateau_factor", "pct_start", "rollback_lr_factor"):
            _require_open_unit_interval(name, getattr(self, name))
        for name in ("dropout", "drop_path", "momentum", "val_fraction", "attention_dropout", "label_smoothing"):
            if getattr(self, name) is not None:
                _require_in_unit_interval(name, getattr(self, name))
        for name in ("step_epochs", "restart_epochs", "memory_budget", "clip_norm", "clip_value", "swa_lr"):
            if getattr(self, name) is not None:
                _require_positive(name, getattr(self, name))
        if self.batch_size != "auto":
            _require_int_at_least("batch_size", self.batch_size, 1)
        for name in ("eval_batch_size", "accumulate", "keep_checkpoints", "restart_mult", "epochs", "threads",
                     "train_size", "max_steps", "block_size", "layers", "heads", "width", "swa_start",
                     "lr_reference_batch", "log_every_steps"):  # fmt: skip
            _require_int_at_least(name, getattr(self, name), 1)
        for name in ("patience", "val_size", "augment_shift", "seed", "keep_every_epochs", "checkpoint_every_steps",
                     "max_rollbacks", "max_skipped_steps", "plateau_patience", "num_workers", "val_every_steps",
                     "warmup_steps"):  # fmt: skip
            _require_int_at_least(name, getattr(self, name), 0)
        if self.seed > MAX_SEED:
            raise ConfigError(f"--seed must be at most 2**32 - 1 = {MAX_SEED} (NumPy's seed range), got {self.seed}")
        cores = os.cpu_count() or 1
        if self.threads is not None and self.threads > cores:
            raise ConfigError(f"--threads {self.threads} is more than the {cores} CPU cores here; use at most {cores}")
        if not self.hidden or any(h < 1 for h in self.hidden):  # types are checked already
            raise ConfigError(f"--hidden must be a list of positive layer widths, e.g. 256,128; got {short_repr(self.hidden)}")
        if self.channels is not None and (not self.channels or any(c < 1 for c in self.channels)):
            raise ConfigError(f"--channels must be a list of positive channel counts, e.g. 32,64,128; got {short_repr(self.channels)}")

    def _validate_schedule(self) -> None:
        """Schedule settings that cannot work over this run, refused in the epochs the user typed."""
        if self.lr != "auto" and self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} must be at most the peak --lr {self.lr}")
        warmup = 0.0 if self.warmup is None else self.warmup
        _require_non_negative("warmup", warmup)
        if self.warmup_steps is not None:
            if self.warmup is not None:
                raise ConfigError("give the warmup once: --warmup (epochs) or --warmup-steps, not both")
            if self.schedule == "onecycle" and self.warmup_steps:
                raise ConfigError("--schedule onecycle has its own warmup (--pct-start); drop --warmup-steps")
            if self.max_steps is not None and self.warmup_steps >= self.max_steps:
                raise ConfigError(f"--warmup-steps {self.warmup_steps} is not shorter than the run (--max-steps "
                                  f"{self.max_steps}): the lr would never leave warmup")  # fmt: skip
        if self.schedule == "onecycle" and warmup > 0:
            raise ConfigError("--schedule onecycle has its own warmup (--pct-start); drop --warmup or set it to 0")
        if self.epochs is not None and warmup >= self.epochs:
            raise ConfigError(
                f"--warmup {warmup:g} epochs is not shorter than the run (--epochs {self.epochs}): the lr would "
                f"never leave warmup; use a smaller --warmup or more --epochs"
            )
        for milestone in self.milestones:
            _require_positive("milestones", milestone)
        if any(later <= earlier for earlier, later in zip(self.milestones, self.milestones[1:])):
            raise ConfigError(f"--milestones must be strictly increasing epochs, got {_epochs(self.milestones)}")
        if self.milestones and self.epochs is not None:
            outside = [m for m in self.milestones if not warmup < m < self.epochs]
            if outside:
                raise ConfigError(
                    f"--milestones {_epochs(outside)} lie outside the run: each must be after the warmup "
                    f"({warmup:g} epochs) and before the last epoch ({self.epochs})"
                )

    def _validate_averaging(self, loop_only: bool) -> None:
        """EMA or SWA, each with settings that can take effect; label smoothing on a cross-entropy task."""
        if self.ema is not None:
            _require_open_unit_interval("ema", self.ema)
            if self.swa_start is not None:
                raise ConfigError("--ema and --swa-start are two ways to average the weights; choose one")
        if self.swa_lr is not None and self.swa_start is None:
            raise ConfigError("--swa-lr is the lr of stochastic weight averaging; give --swa-start EPOCH too")
        if self.swa_start is not None and self.epochs is not None and self.swa_start > self.epochs:
            raise ConfigError(f"--swa-start {self.swa_start} is after the last epoch ({self.epochs}): nothing "
                              f"would be averaged; use an epoch in 1..{self.epochs}")  # fmt: skip
        if self.swa_start is not None and self.patience > 0 and not loop_only:
            raise ConfigError("--swa-start averages the last epochs, which early stopping's restore would replace; "
                              "pass --patience 0")  # fmt: skip
        if self.label_smoothing and self.task not in SMOOTHED_TASKS:
            raise ConfigError(f"--label-smoothing applies to cross-entropy tasks ({', '.join(SMOOTHED_TASKS)}), "
                              f"not --task {self.task}")  # fmt: skip
        if self.label_smoothing and self.loss is not None:
            raise ConfigError(f"--label-smoothing sets the task's own cross-entropy; --loss {self.loss} replaces "
                              f"it (give the smoothing to your loss instead)")  # fmt: skip
        if self.lr_scaling is not None and self.lr == "auto":
            raise ConfigError("--lr auto finds the lr for this batch size itself; drop --lr-scaling")

    def _validate_monitor(self, loop_only: bool) -> None:
        """--monitor must be a metric the task logs (the Trainer checks against its own task instead)."""
        available = () if loop_only else build_task(self.task, metrics=self.metrics).monitorable(LOOP_MONITORABLE)
        if not loop_only and self.monitor not in available:
            raise ConfigError(f"--monitor {short_repr(self.monitor)} is not a metric of the run; choose one of {', '.join(available)}")
        self.resolved_monitor_mode()
        if self.val_size == 0 and self.patience > 0 and self.monitor.startswith("val_"):
            raise ConfigError(
                f"--val-size 0 leaves no validation data, but early stopping monitors {self.monitor}; "
                f"pass --patience 0 or --monitor train_loss"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# What the Trainer reads; the other fields describe the recipe (data, model) around it.
LOOP_FIELDS = (
    "optimizer", "fused_optimizer", "lr", "weight_decay", "momentum", "batch_size", "eval_batch_size", "num_workers", "epochs",
    "max_steps", "val_every_steps", "schedule", "warmup", "warmup_steps", "min_lr", "step_epochs", "gamma", "milestones",
    "pct_start", "anneal", "restart_epochs", "restart_mult", "plateau_patience", "plateau_factor", "clip_norm",
    "clip_value", "accumulate", "lr_scaling", "lr_reference_batch", "ema", "swa_start", "swa_lr", "eval_average",
    "label_smoothing", "precision", "channels_last", "compile", "monitor", "monitor_mode", "min_delta",
    "keep_checkpoints", "keep_every_epochs", "checkpoint_every_steps", "on_save_error", "on_nonfinite",
    "rollback_lr_factor", "max_rollbacks", "max_skipped_steps", "seed", "device", "strategy", "threads",
    "deterministic", "tf32", "sync_batchnorm", "fsdp_offload", "fsdp_units",
)  # fmt: skip


def default_warmup(schedule: str, epochs: int) -> float:
    """warmup_cosine warms up for one epoch, or half the run when the run is shorter than two."""
    return min(1.0, epochs / 2) if schedule == "warmup_cosine" else 0.0


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field (what the user typed, so what errors name)."""
    return FLAG_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


def recipe_config(values: Mapping[str, Any], source: str = "settings") -> TrainConfig:
    """A config from the settings given, the rest from their dataset's recipe: ``--dataset text``
    runs a Transformer language model with TEXT_RECIPES' defaults, any other dataset the MNIST
    recipe (TrainConfig's own defaults). What the CLI builds from a config file and flags."""
    if not isinstance(values, Mapping) or not all(isinstance(key, str) for key in values):
        return config_from_dict(values, source)  # refused there, in one line
    given = {key.replace("-", "_"): value for key, value in values.items()}
    return config_from_dict({**recipe_defaults(given), **given}, source)


def recipe_defaults(given: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's settings for what the user did not set (see recipe_config)."""
    if given.get("dataset") != "text":
        return {}
    model = given.get("model", TEXT_DEFAULT_MODEL)
    recipe = {"model": TEXT_DEFAULT_MODEL, **TEXT_RECIPES.get(model, TEXT_LOOP_RECIPE)}
    if "precision" not in given:  # bf16 where it measures faster on the run's device (trainkit.devices)
        recipe["precision"] = "bf16" if fast_bf16(recipe_device(given)) else "fp32"
    if "epochs" in given and "max_steps" not in given:
        del recipe["max_steps"]  # --epochs alone is the budget the user asked for
    if "warmup" in given:
        del recipe["warmup_steps"]  # warmup in epochs instead
    elif isinstance(given.get("max_steps"), int):  # the recipe warms up for 5% of its budget: so of any
        recipe["warmup_steps"] = min(recipe["warmup_steps"], max(0, given["max_steps"] // 20))
    return recipe


def recipe_device(given: Mapping[str, Any]) -> torch.device:
    """The device a recipe is chosen for: the run's --device (a wrong one is refused later, in one line)."""
    try:
        return resolve_device(given.get("device", "auto"))
    except (ConfigError, TypeError, AttributeError):
        return torch.device("cpu")


def config_from_dict(values: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """Build a config from a mapping, rejecting unknown keys and values of the wrong type."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: expected a mapping of settings, got {_kind(values)}")
    bad_keys = [key for key in values if not isinstance(key, str)]
    if bad_keys:
        raise ConfigError(f"{source}: setting names must be strings, got {short_repr(bad_keys[0])}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    normalised = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(normalised) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting(s) {_shorten(', '.join(unknown))}; valid settings: {', '.join(sorted(known))}"
        )
    try:
        check_field_types(normalised)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    for name in OFF_WHEN_ZERO:
        if normalised.get(name) == 0 and not isinstance(normalised[name], bool):
            normalised[name] = None
    return TrainConfig(**normalised)


def load_config_file(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a TOML, YAML or JSON config file into a plain mapping of settings (``what``: how errors name it).

    Bounded: at most MAX_CONFIG_BYTES read, MAX_CONFIG_VALUES values nested MAX_CONFIG_DEPTH deep, no YAML
    anchors, and no key given twice, each refused in one line before any setting is used.
    """
    path = Path(path)
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"{what} {path}: use a .toml, .yaml/.yml or .json file")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    text = _read_config_text(path, what)
    try:
        values = _parse_config_text(text, path.suffix)
        _check_config_size(values)
    except ConfigError as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{what} {path}: {_too_deep()}") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} {path} is not valid: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {_one_line(exc)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of settings, got {type(values).__name__}")
    return values


def _read_config_text(path: Path, what: str) -> str:
    """The file's text, refused past MAX_CONFIG_BYTES (read no further: the file may be huge or growing)."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB; is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start}); is it the right file?") from None


def _parse_config_text(text: str, suffix: str) -> Any:
    if suffix == ".toml":
        return tomllib.loads(text)  # refuses duplicate keys itself
    if suffix == ".json":
        return json.loads(text, object_pairs_hook=_json_object)
    return yaml.load(text, Loader=ConfigYamlLoader) or {}  # noqa: S506 (a SafeLoader)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json keeps the last one silently)."""
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in values:
            raise ConfigError(_duplicate_key(key))
        values[key] = value
    return values


def _duplicate_key(key: Any, line: int | None = None) -> str:
    where = "" if line is None else f" (line {line})"
    return f"duplicate key {short_repr(key)}{where}: give each setting once (the last one would win silently)"


def _check_config_size(values: Any) -> None:
    """Refuse a structure larger or deeper than any config needs; walked without recursion, stopping early."""
    pending, count = [(values, 1)], 0
    while pending:
        value, depth = pending.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(f"holds more than {MAX_CONFIG_VALUES} values; a config file needs far fewer")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(_too_deep())
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        pending.extend((child, depth + 1) for child in children)


def _too_deep() -> str:
    return f"nests its values more than {MAX_CONFIG_DEPTH} levels deep"


YAML_MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigYamlLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, made fit for config files.

    Refuses anchors and aliases (a 600-byte file of nested aliases expands to gigabytes) and keys given
    twice (PyYAML keeps the last silently), and reads ``1e-3`` as a number as YAML 1.2 does (PyYAML's
    YAML 1.1 float needs a dot: ``lr: 1e-3`` would be the string "1e-3").
    """

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML anchors and aliases (&name, *name) are not "
                              f"supported; write the values out")  # fmt: skip
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self._refuse_duplicate_keys(node)
        return super().construct_mapping(node, deep=deep)

    def _refuse_duplicate_keys(self, node: yaml.MappingNode) -> None:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == YAML_MERGE_TAG:
                continue  # a list as a key is refused by SafeLoader itself
            key = self.construct_object(key_node)
            if key in seen:
                raise ConfigError(_duplicate_key(key, key_node.start_mark.line + 1))
            seen.add(key)


# YAML 1.2's floats: PyYAML's YAML 1.1 resolver reads "1e-3" (no dot) as a string. Tried after
# PyYAML's own int and float resolvers, so what they read as numbers is unchanged.
ConfigYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?\.[0-9_]+[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


# ------------------------------------------------------------------- type checks
@cache
def field_types() -> dict[str, Any]:
    """Each field's declared type, read from the dataclass: the one source of what a value may be."""
    return get_type_hints(TrainConfig)


def check_field_types(values: Mapping[str, Any]) -> None:
    """Refuse any value whose type the field does not declare (e.g. ``lr = true``, ``hidden = 64``).

    bool is not accepted as a number and strings are never converted: a config file that says
    ``grad_checkpointing = "false"`` must not turn the feature on.
    """
    types_ = field_types()
    for name, value in values.items():
        expected = types_.get(name)
        if expected is not None and not _matches(value, expected):
            raise ConfigError(f"{flag_name(name)} must be {_describe(expected)}, got {short_repr(value)} ({_kind(value)})")


def setting_accepts(name: str, value: Any) -> bool:
    """Whether the setting's declared type takes ``value`` (e.g. a float for lr, only ints for batch_size)."""
    return _matches(value, field_types()[name])


def _matches(value: Any, expected: Any) -> bool:
    origin = get_origin(expected)
    if origin in (Union, types.UnionType):
        return any(_matches(value, option) for option in get_args(expected))
    if origin is Literal:
        return isinstance(value, str) and value in get_args(expected)
    if origin is list:
        (item,) = get_args(expected)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(key, str) for key in value)
    if expected is Any:
        return True
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)  # str, os.PathLike


def _describe(expected: Any) -> str:
    origin = get_origin(expected)
    if origin in (Union, types.UnionType):
        options = [_describe(o) for o in get_args(expected) if o is not type(None)]
        return " or ".join(dict.fromkeys(options))
    if origin is Literal:
        return " or ".join(repr(v) for v in get_args(expected))
    if origin is list:
        return f"a list of {_describe(get_args(expected)[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict:
        return "a table of settings"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", os.PathLike: "a path"}
    return names.get(expected, expected.__name__)


def _kind(value: Any) -> str:
    """How a config file would call the value's type."""
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             tuple: "a list", dict: "a table"}  # fmt: skip
    return kinds.get(type(value), type(value).__name__)


# --------------------------------------------------------------- value checks
def _require_choice(name: str, value: str, choices: tuple[str, ...], more: str = "") -> None:
    if value not in choices:
        raise ConfigError(f"{flag_name(name)} must be one of {', '.join(choices)}{' ' + more if more else ''}; "
                          f"got {short_repr(value)}")


def is_factory_path(value: str) -> bool:
    """MODULE:FUNCTION (a user's model or dataset factory), as opposed to a trainkit name."""
    module, colon, function = value.partition(":")
    return bool(colon and module and function)


def _require_positive(name: str, value: float) -> None:
    if not 0 < value <= MAX_FLOAT_SETTING:  # NaN fails too
        raise ConfigError(f"{flag_name(name)} must be a positive finite number, got {value}{_float32_note(value)}")


def _require_non_negative(name: str, value: float) -> None:
    if not 0 <= value <= MAX_FLOAT_SETTING:
        raise ConfigError(f"{flag_name(name)} must be a finite number >= 0, got {value}{_float32_note(value)}")


def _float32_note(value: float) -> str:
    """Why a finite number beyond MAX_FLOAT_SETTING is refused (it is finite in Python, not in training)."""
    if math.isfinite(value) and value > MAX_FLOAT_SETTING:
        return f" (at most {MAX_FLOAT_SETTING:.2g}: training computes with it in float32, where more overflows)"
    return ""


def _require_open_unit_interval(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{flag_name(name)} must be in (0, 1), got {value}")


def _require_in_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{flag_name(name)} must be in [0, 1), got {value}")


def _require_int_at_least(name: str, value: int | None, minimum: int) -> None:
    """Types are checked already; None means 'the default' for the optional fields."""
    if value is not None and value < minimum:
        raise ConfigError(f"{flag_name(name)} must be an integer >= {minimum}, got {value}")


def _epochs(values: list[float]) -> str:
    return _shorten(",".join(f"{v:g}" for v in values))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _short_repr_limits() -> reprlib.Repr:
    """A repr that stops early on huge values (a 100k-item list is not formatted whole only to be cut)."""
    limits = reprlib.Repr()
    limits.maxlevel, limits.maxlist, limits.maxtuple, limits.maxdict = 3, 20, 20, 10
    limits.maxstring = limits.maxother = MAX_SHOWN_CHARS
    return limits


_SHORT_REPR = _short_repr_limits()


def short_repr(value: Any) -> str:
    """The value's repr cut to MAX_SHOWN_CHARS, so an error about ``hidden: <huge list>`` stays one short line."""
    return _shorten(_SHORT_REPR.repr(value))


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 1] + "…"
