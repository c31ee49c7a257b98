"""What a checkpoint is used for after training: ``trainkit evaluate``, ``export`` and
``generate`` rebuild its model from the settings it stores, running no factory the user did not
name (docs/reliability.md, "What is safe to load").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from trainkit.checkpoint.export import SUFFIXES, export_model
from trainkit.checkpoint.file import state_dict_mismatch
from trainkit.checkpoint.rundir import remove_stale_temp_files, run_folder_of  # fmt: skip
from trainkit.checkpoint.sharded import is_sharded_checkpoint
from trainkit.checkpoint.store import (
    BEST_FILE,
    CHECKPOINT_NAME,
    SET_ASIDE_SUFFIX,
    SHARDED_BEST,
    CheckpointDir,
    load_checkpoint,
)  # fmt: skip
from trainkit.config.files import config_from_dict
from trainkit.config.schema import TrainConfig
from trainkit.config.values import is_factory_path
from trainkit.data.epochs import as_epoch_batches
from trainkit.data.runtime import map_tensors
from trainkit.devices import resolve_device
from trainkit.errors import CheckpointError, ConfigError
from trainkit.loop.averaging import evaluation_weights
from trainkit.loop.trainer import Trainer
from trainkit.precision import precision_for_inference
from trainkit.recipes.components import (
    RunData,
    build_model_from_config,
    build_run_task,
    evaluation_data,
    load_training_data,
    rows_of,
)  # fmt: skip
from trainkit.recipes.factories import build_user_model, require_named_factories
from trainkit.recipes.resume import known_settings, saved_settings, warn_if_factories_changed
from trainkit.recipes.text.generate import check_sampling, generate
from trainkit.recipes.text.models import build_sequence_model
from trainkit.recipes.text.tokenizers import tokenizer_from_state


def checkpoint_model(
    path: str | Path, *, data_dir: str | None = None, device: str = "auto", factories: Factories | None = None,
) -> tuple[TrainConfig, RunData, nn.Module, dict]:  # fmt: skip
    """A checkpoint's model with its (evaluation) weights, and the config and data it was trained
    with, rebuilt from the settings stored in it (a user's model from its MODULE:FUNCTION factory,
    imported only when ``factories`` names or trusts it)."""
    payload = load_checkpoint(path)
    config = checkpoint_config(payload, path, factories or Factories())
    where = resolve_device(device)
    config = dataclasses.replace(config, device=device, data_dir=config.data_dir if data_dir is None else data_dir,
                                 precision=precision_for_inference(config.precision, where))  # fmt: skip
    config.validate()
    data = load_training_data(config, where)
    model = build_model_from_config(config, data)
    warn_if_factories_changed(payload, path, config)
    mismatch = state_dict_mismatch(model, payload["model"])
    if mismatch is not None:
        raise CheckpointError(f"{path}: its weights do not fit the model its settings describe ({mismatch})")
    model.load_state_dict(evaluation_weights(payload))
    return config, data, model, payload


@dataclasses.dataclass(frozen=True)
class Factories:
    """The MODULE:FUNCTION factories the user named for a command that reads a checkpoint
    (``--model``, ``--dataset``), and whether they trust the ones it names (``--trust-factories``)."""

    model: str | None = None
    dataset: str | None = None
    trust: bool = False

    def named(self) -> dict[str, str]:
        return {key: value for key, value in (("model", self.model), ("dataset", self.dataset)) if value is not None}


def checkpoint_config(payload: dict[str, Any], path: str | Path, factories: Factories) -> TrainConfig:
    """The settings stored in a checkpoint, with the factories the user named in their place; a
    factory named only inside the file is refused (trainkit.recipes.factories.require_named_factories)."""
    settings = {**known_settings(saved_settings(payload), f"checkpoint {path}"), **factories.named()}
    require_named_factories(settings, factories.named(), trust=factories.trust, source=f"checkpoint {path}")
    try:
        return config_from_dict(settings, source=f"the settings stored in {path}").resolved()
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def evaluate_checkpoint(path: str | Path, *, data_dir: str | None = None, device: str = "auto",
                        factories: Factories | None = None) -> dict:  # fmt: skip
    """Test-set loss and metrics of a checkpoint (the validation split's when there is no test set)."""
    config, data, model, payload = checkpoint_model(path, data_dir=data_dir, device=device, factories=factories)
    trainer = Trainer(model, config, task=build_run_task(config))
    split = "test" if getattr(data, "test", None) is not None else "val"
    evaluated = evaluation_data(config, data, split)
    if evaluated is None:
        raise ConfigError(f"{config.dataset} returned no test or validation data to evaluate {path} on")
    results = trainer.evaluate(evaluated)
    return {"checkpoint": str(path), "epoch": payload["epoch"], "split": split,
            **{f"test_{name}": value for name, value in sorted(results.items(), key=lambda item: item[0] == "loss")},
            "test_samples": rows_of(getattr(data, split))}  # fmt: skip


EXAMPLE_ROWS = 16  # the validation rows an export is verified on


def export_checkpoint(path: str | Path, *, format: str, out: str | Path | None = None, data_dir: str | None = None,
                      factories: Factories | None = None, overwrite: bool = False) -> dict:  # fmt: skip
    """`trainkit export`: the checkpoint's model (its EMA/SWA weights when it has them) in ``format``,
    verified on the first validation rows (trainkit.checkpoint.export); ``out`` defaults to the checkpoint's
    path with the format's suffix."""
    if format not in SUFFIXES:
        raise ConfigError(f"--format must be one of {', '.join(SUFFIXES)}, got {format!r}")
    target = Path(out) if out is not None else Path(path).with_suffix(SUFFIXES[format])
    check_export_target(target, Path(path), overwrite=overwrite)
    remove_stale_temp_files(target.parent)  # an export killed before: only trainkit's own marked temp names
    config, data, model, _ = checkpoint_model(path, data_dir=data_dir, device="cpu", factories=factories)
    split = "val" if getattr(data, "val", None) is not None else "test"
    evaluated = evaluation_data(config, data, split)
    if evaluated is None:
        raise ConfigError(f"{config.dataset} returned no validation or test data to verify the export on")
    batch = next(iter(as_epoch_batches(evaluated, batch_size=EXAMPLE_ROWS, shuffle=False).epoch(0, 0)))
    inputs = map_tensors(lambda tensor: tensor[:EXAMPLE_ROWS], build_run_task(config).split(batch)[0])
    return export_model(model, inputs, format, target, rebuild=lambda: build_model_from_config(config, data))


def check_export_target(target: Path, source: Path, *, overwrite: bool) -> None:
    """The checkpoint itself, or any file of a run folder's own, is never an export's target; another
    existing file is replaced only when the user asks (``--overwrite``)."""
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        raise ConfigError(f"--out {target} is the checkpoint being exported; choose another file")
    if is_run_folder_file(target):
        raise ConfigError(f"--out {target} is one of its run folder's own files; choose another name or folder")
    if target.exists() and not overwrite:
        raise ConfigError(f"--out {target} exists; pass --overwrite to replace it, or choose another file")


def is_run_folder_file(path: Path) -> bool:
    """A file a trainkit run folder owns (rundir.run_folder_of), except that an export may add a new
    file beside the checkpoints (its default: the checkpoint's name with the format's suffix)."""
    if run_folder_of(path) is None:
        return False
    in_checkpoints = path.resolve().parent.name == "checkpoints"
    return not in_checkpoints or bool(CHECKPOINT_NAME.match(path.name) or path.name in (BEST_FILE, SHARDED_BEST)
                                      or path.name.endswith(SET_ASIDE_SUFFIX))  # fmt: skip


def generate_from_checkpoint(
    path: str | Path, *, prompt: str, tokens: int = 200, temperature: float = 1.0, top_k: int | None = None,
    seed: int = 0, device: str = "auto", factories: Factories | None = None,
) -> str:  # fmt: skip
    """`trainkit generate`: a text run's model and tokenizer rebuilt from a checkpoint (a run
    folder: its newest checkpoint that verifies), then ``trainkit.recipes.text.generate``."""
    check_sampling(tokens, temperature, top_k)  # before any file is read
    path, payload = text_checkpoint(Path(path))
    tokenizer = tokenizer_from_state(payload["run_info"]["tokenizer"])
    config = checkpoint_config(payload, path, factories or Factories())
    model = (build_user_model(config.model, config.model_args) if is_factory_path(config.model)
             else build_sequence_model(config, tokenizer.vocab_size))  # fmt: skip
    mismatch = state_dict_mismatch(model, payload["model"])
    if mismatch is not None:
        raise CheckpointError(f"{path}: its weights do not fit the model its settings describe ({mismatch})")
    model.load_state_dict(evaluation_weights(payload))
    model.to(resolve_device(device))
    return generate(model, tokenizer, prompt, tokens=tokens, temperature=temperature, top_k=top_k, seed=seed,
                    context=config.block_size)  # fmt: skip


def text_checkpoint(path: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint at ``path`` (a file, a sharded folder, or a run folder: its newest valid one),
    refused unless it is a text run's."""
    if path.is_dir() and not is_sharded_checkpoint(path):
        found = CheckpointDir(path / "checkpoints").newest_valid(set_aside=False, include_best=True)
        if found is None:
            raise CheckpointError(f"{path} holds no checkpoint that verifies: is it a trainkit run folder?")
        path, payload = found
    else:
        payload = load_checkpoint(path)
    if "tokenizer" not in payload.get("run_info", {}):
        raise CheckpointError(f"{path} is not a --dataset text run's checkpoint (it stores no tokenizer)")
    return path, payload
