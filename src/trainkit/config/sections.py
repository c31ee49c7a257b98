"""TrainConfig's fields in sections, like the code's parts (torchtitan's habit): what ``--help``
groups the flags by, and the tables a config file may use (``[optim]`` with ``lr = 3e-4``).
The fields themselves stay flat — ``TrainConfig(lr=...)``, ``config.lr``, ``config.json``,
checkpoints and tune spaces are unchanged — so every flat name keeps working."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainkit.config.values import short_repr
from trainkit.errors import ConfigError

SECTIONS: dict[str, tuple[str, ...]] = {
    "data": ("dataset", "dataset_args", "data_dir", "val_size", "train_size", "augment_shift", "num_workers"),
    "text": ("data_file", "tokenizer", "vocab_size", "val_fraction", "block_size"),
    "network": ("model", "model_args", "hidden", "channels", "norm", "dropout", "drop_path", "norm_after_dropout",
              "activation", "init", "grad_checkpointing"),
    "sequence_model": ("layers", "heads", "width", "norm_position", "attention_dropout", "tie_weights"),
    "objective": ("task", "metrics", "loss", "label_smoothing"),
    "optim": ("optimizer", "fused_optimizer", "lr", "weight_decay", "momentum", "lr_scaling", "lr_reference_batch",
              "clip_norm", "clip_value"),
    "lr_schedule": ("schedule", "warmup", "warmup_steps", "min_lr", "step_epochs", "gamma", "milestones", "pct_start",
                 "anneal", "restart_epochs", "restart_mult", "plateau_patience", "plateau_factor"),
    "batching": ("batch_size", "accumulate", "eval_batch_size", "memory_budget"),
    "duration": ("epochs", "max_steps", "val_every_steps"),
    "averaging": ("ema", "swa_start", "swa_lr", "eval_average", "tta"),
    "performance": ("precision", "channels_last", "compile", "threads", "deterministic", "tf32"),
    "parallel": ("strategy", "sync_batchnorm", "fsdp_offload", "fsdp_units"),
    "selection": ("monitor", "monitor_mode", "min_delta", "patience"),
    "checkpointing": ("keep_checkpoints", "keep_every_epochs", "checkpoint_every_steps", "on_save_error"),
    "nonfinite": ("on_nonfinite", "rollback_lr_factor", "max_rollbacks", "max_skipped_steps"),
    "run": ("seed", "device", "out", "plots"),
    "logging": ("logger", "log_every_steps", "mlflow_uri", "mlflow_experiment"),
}  # fmt: skip
SECTION_OF = {name: section for section, names in SECTIONS.items() for name in names}


def flat_settings(values: Any, source: str) -> Any:
    """A config's settings with its section tables opened (``[optim] lr = 3e-4`` is ``lr = 3e-4``);
    anything but a mapping is returned as it is, for the caller's own one-line refusal. A setting
    in a section it does not belong to, or given twice (flat and in its table), is one line."""
    if not isinstance(values, Mapping):
        return values
    flat: dict[Any, Any] = {}

    def put(name: Any, value: Any, where: str) -> None:
        field = name.replace("-", "_") if isinstance(name, str) else name
        if field in seen:
            raise ConfigError(f"{source}: {short_repr(name)} is given twice ({seen[field]} and {where}); give it once")
        seen[field] = where
        flat[name] = value

    seen: dict[Any, str] = {}
    for key, value in values.items():
        if isinstance(key, str) and key in SECTIONS and isinstance(value, Mapping):
            for name, inner in value.items():
                field = name.replace("-", "_") if isinstance(name, str) else name
                if SECTION_OF.get(field) != key:
                    home = f"it belongs in [{SECTION_OF[field]}]" if field in SECTION_OF else "no such setting"
                    raise ConfigError(f"{source}: [{key}] has no setting {short_repr(name)} ({home})")
                put(name, inner, f"[{key}]")
        else:
            put(key, value, "at the top level")
    return flat
