"""Run configuration as explicit data.

One flat dataclass holds everything a run needs. The CLI builds it from a config file
(TOML or YAML) and overrides it with the flags given; the Python API builds it directly.
``validate`` turns nonsense (a negative learning rate, dropout of 1.5) into a one-line
``ConfigError`` before any work starts.

The lists of choices are in trainkit.config.names, files in trainkit.config.files.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from trainkit.choices import DATASET_NAMES, NORM_POSITIONS, SEQUENCE_MODELS, SEQUENCE_NORMS, TOKENIZERS, TTA_MODES
from trainkit.config.names import (
    ANNEALS,
    LOOP_DEFAULTS,
    LOOP_MONITORABLE,
    MAX_SEED,
    MAX_VOCAB,
    MIN_BPE_VOCAB,
    MODEL_RECIPES,
    MODES,
    NONFINITE_POLICIES,
    OPTIMIZERS,
    PRECISIONS,
    SAVE_ERROR_POLICIES,
    SCHEDULES,
    TASK_NAMES,
    flag_name,
)  # fmt: skip
from trainkit.config.values import (
    epochs,
    is_factory_path,
    require_choice,
    require_in_unit_interval,
    require_int_at_least,
    require_non_negative,
    require_open_unit_interval,
    require_positive,
    short_repr,
    shorten,
)  # fmt: skip
from trainkit.devices import require_device
from trainkit.distributed import STRATEGIES
from trainkit.errors import ConfigError
from trainkit.loop.callbacks import monitor_direction
from trainkit.optim.optimizers import LR_SCALINGS
from trainkit.tasks.kinds import SMOOTHED_TASKS, build_task
from trainkit.tracking.loggers import check_loggers


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
    batch_size: int | Literal["auto"] = 128  # or "auto": the largest power of two that fits (trainkit.loop.memory)
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
    tta: str | None = None  # test-time augmentation reported beside the plain test: "shifts" (trainkit.recipes.tta)
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
    # logging beyond history.csv (trainkit.tracking.loggers): continued into the same logged run on --resume
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
            require_choice(name, getattr(self, name), choices)
        for name, choices in (("lr_scaling", tuple(LR_SCALINGS)), ("tta", TTA_MODES)):
            if getattr(self, name) is not None:
                require_choice(name, getattr(self, name), choices)
        if self.fused_optimizer and self.optimizer != "adamw":
            raise ConfigError(f"--fused-optimizer is AdamW's fused kernel; --optimizer {self.optimizer} has none here")
        require_device(self.device)

    def _validate_recipe_choices(self) -> None:
        """The MNIST recipe's names, imported here only: the Trainer (loop_only) never needs the recipe."""
        from trainkit.nn.init import INIT_SCHEMES
        from trainkit.nn.layers import ACTIVATIONS, NORMS
        from trainkit.nn.models import MODEL_NAMES

        for name, names in (("dataset", (*DATASET_NAMES, "text")), ("model", (*MODEL_NAMES, *SEQUENCE_MODELS))):
            if not is_factory_path(getattr(self, name)):
                require_choice(name, getattr(self, name), names, "or MODULE:FUNCTION for your own")
        sequence = self.model in SEQUENCE_MODELS
        if self.channels is not None and self.model != "cnn":
            raise ConfigError(f"--channels sets the cnn's conv stages; --model {self.model} has none (MLPs: --hidden)")
        for name, choices in (("norm", SEQUENCE_NORMS if sequence else NORMS), ("activation", ACTIVATIONS),
                              ("init", INIT_SCHEMES), ("tokenizer", TOKENIZERS), ("norm_position", NORM_POSITIONS)):  # fmt: skip
            require_choice(name, getattr(self, name), choices)
        self._validate_factory_args()
        self._validate_text_recipe(sequence)
        check_loggers(self.logger)

    def _validate_factory_args(self) -> None:
        """dataset_args / model_args go to a MODULE:FUNCTION factory: a built-in would ignore them silently."""
        for owner in ("dataset", "model"):
            args, name = getattr(self, f"{owner}_args"), getattr(self, owner)
            if args and not is_factory_path(name):
                raise ConfigError(f"--{owner}-arg / {owner}_args ({shorten(', '.join(args))}) are keyword arguments "
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
            require_positive("lr", self.lr)
        for name in ("min_lr", "weight_decay", "min_delta"):
            require_non_negative(name, getattr(self, name))
        for name in ("gamma", "plateau_factor", "pct_start", "rollback_lr_factor"):
            require_open_unit_interval(name, getattr(self, name))
        for name in ("dropout", "drop_path", "momentum", "val_fraction", "attention_dropout", "label_smoothing"):
            if getattr(self, name) is not None:
                require_in_unit_interval(name, getattr(self, name))
        for name in ("step_epochs", "restart_epochs", "memory_budget", "clip_norm", "clip_value", "swa_lr"):
            if getattr(self, name) is not None:
                require_positive(name, getattr(self, name))
        if self.batch_size != "auto":
            require_int_at_least("batch_size", self.batch_size, 1)
        for name in ("eval_batch_size", "accumulate", "keep_checkpoints", "restart_mult", "epochs", "threads",
                     "train_size", "max_steps", "block_size", "layers", "heads", "width", "swa_start",
                     "lr_reference_batch", "log_every_steps"):  # fmt: skip
            require_int_at_least(name, getattr(self, name), 1)
        for name in ("patience", "val_size", "augment_shift", "seed", "keep_every_epochs", "checkpoint_every_steps",
                     "max_rollbacks", "max_skipped_steps", "plateau_patience", "num_workers", "val_every_steps",
                     "warmup_steps"):  # fmt: skip
            require_int_at_least(name, getattr(self, name), 0)
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
        require_non_negative("warmup", warmup)
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
            require_positive("milestones", milestone)
        if any(later <= earlier for earlier, later in zip(self.milestones, self.milestones[1:])):
            raise ConfigError(f"--milestones must be strictly increasing epochs, got {epochs(self.milestones)}")
        if self.milestones and self.epochs is not None:
            outside = [m for m in self.milestones if not warmup < m < self.epochs]
            if outside:
                raise ConfigError(
                    f"--milestones {epochs(outside)} lie outside the run: each must be after the warmup "
                    f"({warmup:g} epochs) and before the last epoch ({self.epochs})"
                )

    def _validate_averaging(self, loop_only: bool) -> None:
        """EMA or SWA, each with settings that can take effect; label smoothing on a cross-entropy task."""
        if self.ema is not None:
            require_open_unit_interval("ema", self.ema)
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
            raise ConfigError(f"{flag_name(name)} must be {_describe(expected)}, got {short_repr(value)} ({kind_of(value)})")


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


def kind_of(value: Any) -> str:
    """How a config file would call the value's type."""
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             tuple: "a list", dict: "a table"}  # fmt: skip
    return kinds.get(type(value), type(value).__name__)
