"""What a run trains: its data, model and task, from trainkit's recipes or the user's factories.

Two sources, one interface for ``trainkit.recipes.run``:

- trainkit's recipe: an IDX dataset (``trainkit.recipes.images``) as device tensors, a model from
  ``trainkit.nn.models`` sized to it and initialised with ``--init``;
- the user's ``--dataset MODULE:FUNCTION`` / ``--model MODULE:FUNCTION`` (``trainkit.recipes.factories``):
  datasets of any kind, loaded by ``trainkit.data``, and a model kept as its factory built it.

A user model also trains on trainkit's datasets (a CNN of your own on MNIST); a user dataset
needs a user model (trainkit's models are sized for its image datasets).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from trainkit.data.dataset import describe
from trainkit.data.epochs import EpochBatches, as_epoch_batches
from trainkit.config.schema import TrainConfig
from trainkit.config.values import is_factory_path
from trainkit.data.device import DeviceBatches
from trainkit.recipes.images import DatasetSplits, TensorSplit, load_dataset
from trainkit.errors import ConfigError
from trainkit.recipes.factories import UserData, build_user_model, load_user_data
from trainkit.nn.init import init_weights
from trainkit.loop.memory import (
    PROBE_BATCHES, DatasetPrefix, MemoryEstimate, activation_bytes_per_sample, check_model_fits, estimate_training_memory, MAX_AUTO_BATCH, find_batch_size,
)  # fmt: skip
from trainkit.nn.models import build_model, enable_grad_checkpointing
from trainkit.data.runtime import tensors_in
from trainkit.tasks.base import Task, check_data, parameter_dtype
from trainkit.tasks.kinds import build_task, named_loss
from trainkit.recipes.text.data import RandomWindows, TextData, load_text, validation_batches, window_pairs
from trainkit.choices import SEQUENCE_MODELS
from trainkit.recipes.text.models import build_sequence_model
from trainkit.precision import autocast_dtype

log = logging.getLogger("trainkit")

RunData = DatasetSplits | UserData | TextData
FINGERPRINT_SAMPLES = 8  # samples hashed from each end of a user dataset (a full pass could take minutes)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model_from_config(config: TrainConfig, data: RunData) -> nn.Module:
    """The configured model (seeded by the caller): trainkit's, initialised with --init, or the
    user's factory's as it built it."""
    if is_factory_path(config.model):
        model = build_user_model(config.model, config.model_args)
    else:
        model = init_weights(build_architecture(config, data), config.init)
    if config.model in SEQUENCE_MODELS:
        return model  # the Transformer checkpoints its own blocks (--grad-checkpointing)
    return enable_grad_checkpointing(model) if config.grad_checkpointing else model


def build_architecture(config: TrainConfig, data: RunData) -> nn.Module:
    """The configured layers, with PyTorch's default initialisation."""
    if is_factory_path(config.model):
        return build_user_model(config.model, config.model_args)
    if config.model in SEQUENCE_MODELS:
        if not isinstance(data, TextData):
            raise ConfigError(f"--model {config.model} is a language model; give it --dataset text --data-file FILE")
        return build_sequence_model(config, data.vocab_size)
    if not isinstance(data, DatasetSplits):
        raise ConfigError(
            f"--model {config.model} is sized for trainkit's image datasets; with --dataset {data.name} "
            f"give your own model as --model MODULE:FUNCTION"
        )
    options: dict[str, Any] = {"norm": config.norm, "dropout": config.dropout, "activation": config.activation}
    if config.model == "mlp":
        options["hidden"] = tuple(config.hidden)
        if config.norm_after_dropout:
            options["norm_after_dropout"] = True
    if config.model == "residual_mlp":
        options["drop_path"] = config.drop_path
    if config.model == "cnn" and config.channels is not None:
        options["channels"] = tuple(config.channels)
    return build_model(config.model, data.input_shape, data.num_classes, **options)


def model_memory(config: TrainConfig, data: RunData) -> MemoryEstimate | None:
    """The model's weights and optimizer state, estimated on the meta device before it is built."""
    try:
        return estimate_training_memory(lambda: build_architecture(config, data), config.optimizer)
    except Exception as exc:  # a builder the meta device cannot run: the real build reports real errors
        log.debug("no memory estimate for %s: %s", config.model, exc)
        return None


def check_memory(estimate: MemoryEstimate | None, device: torch.device, batch: int, model: str) -> None:
    if estimate is not None:
        sizes = "a smaller --width, --layers or --block-size" if model in SEQUENCE_MODELS else "smaller --hidden widths"
        check_model_fits(estimate, device, batch_size=batch, hint=f"use {sizes} or a smaller --batch-size")


def load_training_data(config: TrainConfig, device: torch.device) -> RunData:
    """The configured dataset and split; ``train_size`` keeps only the first N training images."""
    if is_factory_path(config.dataset):
        return load_user_data(config.dataset, config.dataset_args)
    if config.dataset == "text":
        return load_text(config.data_file, tokenizer=config.tokenizer, vocab_size=config.vocab_size,
                         val_fraction=config.val_fraction, block_size=config.block_size, device=device)  # fmt: skip
    data = load_dataset(config.dataset, config.data_dir, val_size=config.val_size, seed=config.seed, device=device)
    if config.train_size is not None and config.train_size < len(data.train):
        data.train = TensorSplit(data.train.x[: config.train_size], data.train.y[: config.train_size])
    return data


def data_fingerprint(data: RunData) -> dict[str, str]:
    """Identifies the data a run trains and validates on: a digest of every tensor, so a resume
    on other data (even with the same shapes, labels and pixel statistics) is refused. A user
    dataset is identified by its length and its first and last samples (see dataset_digest)."""
    if isinstance(data, UserData):
        return {"dataset": data.name, "train_samples": dataset_digest(data.train), "val_samples": dataset_digest(data.val)}
    if isinstance(data, TextData):  # the ids digest covers the text and the tokenizer that encoded it
        return {"dataset": data.name, "train_tokens": tensor_digest(data.train),
                "val_tokens": "none" if data.val is None else tensor_digest(data.val)}  # fmt: skip
    return {
        "dataset": data.name,
        "train_images": tensor_digest(data.train.x),
        "train_labels": tensor_digest(data.train.y),
        "val_images": tensor_digest(data.val.x),
        "val_labels": tensor_digest(data.val.y),
    }


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and bytes (hashed in place: no copy on CPU)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()[:16]


def training_batches(config: TrainConfig, data: RunData, *, rank: int = 0, world_size: int = 1) -> EpochBatches:
    """The shuffled training batches; with world_size > 1, this rank's slice of each global batch."""
    if isinstance(data, UserData):
        return as_epoch_batches(
            data.train, batch_size=config.batch_size, seed=config.seed, num_workers=config.num_workers,
            rank=rank, world_size=world_size, steps_per_epoch=config.max_steps and config.max_steps * config.accumulate,
        )  # fmt: skip
    if isinstance(data, TextData):
        return RandomWindows(data.train, config.block_size, config.batch_size, seed=config.seed, rank=rank,
                             world_size=world_size)  # fmt: skip
    return DeviceBatches(data.train.x, data.train.y, config.batch_size, seed=config.seed,
                         augment_shift=config.augment_shift, rank=rank, world_size=world_size)  # fmt: skip


def seeded_data_and_model(config: TrainConfig, device: torch.device) -> tuple[TrainConfig, RunData, nn.Module]:
    """Threads, seeds, the data and the initialised model on ``device``, with --batch-size auto
    resolved: the start shared by train, profile and lr-find, so they see the same run."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    data = load_training_data(config, device)
    # refuse a model that cannot fit before allocating it, then its activations before training
    batch = min(PROBE_BATCHES[0] if config.batch_size == "auto" else config.batch_size, rows_of(data.train))
    estimate = model_memory(config, data)
    check_memory(estimate, device, batch, config.model)
    model = build_model_from_config(config, data).to(device)
    if estimate is not None and not config.grad_checkpointing and isinstance(data, DatasetSplits):
        per_sample = activation_bytes_per_sample(model, data.train.x)
        check_memory(dataclasses.replace(estimate, activation_bytes=per_sample * batch), device, batch, config.model)
    if config.batch_size == "auto":
        config = resolve_auto_batch_size(config, model, data)
    return config, data, model


def resolve_auto_batch_size(config: TrainConfig, model: nn.Module, data: RunData) -> TrainConfig:
    """--batch-size auto: the largest power of two that fits (trainkit.loop.memory); logs the choice and why.

    A user's map-style Dataset is probed with real steps of the run's task on its first samples."""
    device = next(model.parameters()).device
    amp_dtype = autocast_dtype(config.precision, device)
    if isinstance(data, UserData):
        if not hasattr(data.train, "__getitem__") or not rows_of(data.train):
            raise ConfigError(f"--batch-size auto needs a map-style Dataset with a length; --dataset {data.name} "
                              f"returned {type(data.train).__name__}: give --batch-size a number")  # fmt: skip
        choice = find_batch_size(model, config, DatasetPrefix(data.train, device), None, amp_dtype=amp_dtype,
                                 task=build_run_task(config))  # fmt: skip
    elif isinstance(data, TextData):
        inputs, targets = window_pairs(data.train, config.block_size, limit=MAX_AUTO_BATCH)
        choice = find_batch_size(model, config, inputs, targets, amp_dtype=amp_dtype, task=build_run_task(config))
    else:
        choice = find_batch_size(model, config, data.train.x, data.train.y, amp_dtype=amp_dtype)
    log.info("--batch-size auto: %d (%s)", choice.batch_size, choice.reason)
    return dataclasses.replace(config, batch_size=choice.batch_size)


def rows_of(dataset: Any) -> int:
    try:
        return len(dataset)
    except TypeError:
        return 0  # an iterable without a length: the size is not known before training


def evaluation_data(config: TrainConfig, data: RunData, split: str, *, rank: int = 0, world_size: int = 1) -> Any:
    """The ``split`` ("val" or "test") for Trainer.evaluate: DeviceBatches for trainkit's data (each rank
    its part), the user's dataset as it is (the Trainer shards it); None when there is none."""
    if isinstance(data, UserData):
        return getattr(data, split)
    if isinstance(data, TextData):  # the whole split in non-overlapping windows (text has no test split)
        ids = getattr(data, split)
        return None if ids is None else validation_batches(ids, config.block_size, config.eval_batch_size, rank=rank,
                                                           world_size=world_size)  # fmt: skip
    tensors = getattr(data, split)
    return DeviceBatches(tensors.x, tensors.y, config.eval_batch_size, shuffle=False, rank=rank,
                         world_size=world_size, lockstep=False)  # fmt: skip


def build_run_task(config: TrainConfig) -> Task:
    """--task with --loss (a torch.nn loss class by name) and --metrics (built-in names)."""
    return build_task(config.task, loss_fn=named_loss(config.loss), metrics=config.metrics,
                      label_smoothing=config.label_smoothing)


def dataset_digest(dataset: Any) -> str:
    """sha256 of a dataset's length and its first and last FINGERPRINT_SAMPLES samples, drawn with
    every RNG seeded (augmentation inside __getitem__ must not change the digest) and restored."""
    if dataset is None:
        return "none"
    digest = hashlib.sha256(f"{type(dataset).__qualname__}|".encode())
    try:
        size = len(dataset)
    except TypeError:
        return digest.hexdigest()[:16]  # an iterable: only its kind is known without consuming it
    digest.update(str(size).encode())
    if not hasattr(dataset, "__getitem__"):
        return digest.hexdigest()[:16]
    indices = sorted(set(range(min(size, FINGERPRINT_SAMPLES))) | set(range(max(0, size - FINGERPRINT_SAMPLES), size)))
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    try:
        for index in indices:
            torch.manual_seed(index), random.seed(index), np.random.seed(index)
            for tensor in tensors_in(dataset[index]):
                digest.update(tensor_digest(tensor).encode())
    finally:
        torch.set_rng_state(states[0]), random.setstate(states[1]), np.random.set_state(states[2])
    return digest.hexdigest()[:16]


def check_samples(task: Task, data: RunData, model: nn.Module | None = None) -> None:
    """A user dataset's samples must be what the task trains on: the first sample must unpack,
    and each split's first samples (its whole tensors for a TensorDataset) must have labels the
    loss takes, one shape, a readable last sample and, given the ``model``, features of its dtype.
    Refused in one line naming the factory, before config.json and any training (not as a
    traceback from inside a step). Train and validation being the same data is a warning."""
    if not isinstance(data, UserData):
        return
    if hasattr(data.train, "__getitem__") and rows_of(data.train):
        check_first_sample(task, data)
    dtype = None if model is None else parameter_dtype(model)
    for split, label in (("train", "training"), ("val", "validation"), ("test", "test")):
        if getattr(data, split) is not None:
            check_data(task, getattr(data, split), f"--dataset {data.name}: {label}", dtype)
    warn_if_validating_on_training_data(data)


def check_first_sample(task: Task, data: UserData) -> None:
    """The first training sample unpacks into what the task needs (inputs and a target)."""
    sample = data.train[0]
    try:
        _, targets = task.split(default_collate([sample]))
    except (ConfigError, TypeError, RuntimeError) as exc:
        raise ConfigError(f"--dataset {data.name}: its samples ({describe(sample)}) do not fit the {task.name} task: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None  # fmt: skip
    if targets is None and task.user_step is None:
        raise ConfigError(
            f"--dataset {data.name}: its samples are {describe(sample)}, with no target for the {task.name} task; "
            f"return (inputs, target) pairs or dicts with a 'targets' key"
        )


def warn_if_validating_on_training_data(data: UserData) -> None:
    """A factory that returns its training set as the validation set too: the validation metrics
    then measure memorisation, and early stopping and the best checkpoint follow them."""
    if data.val is None:
        return
    readable = all(hasattr(split, "__getitem__") and rows_of(split) for split in (data.train, data.val))
    if data.val is data.train or (readable and dataset_digest(data.val) == dataset_digest(data.train)):
        log.warning("--dataset %s returned the same data for training and validation (the same length and first "
                    "and last samples): the validation metrics measure memorisation, not generalisation; return a "
                    "held-out validation set", data.name)  # fmt: skip
