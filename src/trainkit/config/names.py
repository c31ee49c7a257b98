"""The lists of choices and limits the settings are checked against: one source of truth for
each (the CLI offers the same lists), and the recipes' per-model defaults.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from trainkit.tasks.kinds import TASKS

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


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field (what the user typed, so what errors name)."""
    return FLAG_NAMES.get(field_name, "--" + field_name.replace("_", "-"))
