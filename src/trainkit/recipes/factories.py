"""A user's own model and data for ``trainkit train --model MODULE:FUNCTION --dataset MODULE:FUNCTION``.

A factory is a function in a module importable from the current directory or ``PYTHONPATH``.
The model factory is called with ``model_args`` (a table in the config file, or repeated
``--model-arg key=value``) and returns an ``nn.Module``; the dataset factory is called with
``dataset_args`` and returns ``(train, val)`` or ``(train, val, test)`` datasets (anything
``trainkit.data.epochs.as_epoch_batches`` accepts; ``val`` may be None). Every way this can go wrong
is one line naming the factory and what it returned, before any training starts.

A factory is code, so it runs only when the user names it in the command (a flag or the
``--config`` file). A name read from a checkpoint's stored settings or a run folder's
``config.json`` is never imported by itself (``require_named_factories``): the user repeats it
(``--model``, ``--dataset``) or passes ``--trust-factories``, as Hugging Face's
``trust_remote_code``. The current directory goes on ``sys.path`` only for such a named factory.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from trainkit.config.values import is_factory_path
from trainkit.errors import ConfigError

FACTORY_SETTINGS = ("model", "dataset")  # the settings that may name a MODULE:FUNCTION factory


@dataclass
class UserData:
    """The datasets a dataset factory returned."""

    name: str
    train: Any
    val: Any
    test: Any = None


def untrusted_factories(settings: Mapping[str, Any], named: Mapping[str, Any]) -> dict[str, str]:
    """The factories ``settings`` (read from a file the user did not name) would import that the
    user did not name in this command (``named``: the flags and --config file given)."""
    return {key: settings[key] for key in FACTORY_SETTINGS
            if isinstance(settings.get(key), str) and is_factory_path(settings[key]) and named.get(key) != settings[key]}  # fmt: skip


def require_named_factories(settings: Mapping[str, Any], named: Mapping[str, Any], *, trust: bool, source: str) -> None:
    """Refuse to import code named only inside ``source`` (a checkpoint, a run folder's config.json)."""
    untrusted = untrusted_factories(settings, named)
    if untrusted and not trust:
        flags = " ".join(f"--{key} {path}" for key, path in untrusted.items())
        raise ConfigError(
            f"{source} {describe_factories(untrusted)}; trainkit never runs code named inside a file by itself: "
            f"if you trust it, name it yourself ({flags}) or pass --trust-factories"
        )


def describe_factories(factories: Mapping[str, str]) -> str:
    """'names code to import (model os:system)': how a refusal and `trainkit inspect` name them."""
    return f"names code to import ({', '.join(f'{key} {path}' for key, path in factories.items())})"


def factory_sources(config: Any) -> dict[str, str]:
    """The sha256 of each imported factory module's source file, by setting: stored in checkpoints,
    so a factory edited since (same weights' names and shapes, another model) can be named."""
    digests = {}
    for key in FACTORY_SETTINGS:
        path = getattr(config, key, None)
        module = sys.modules.get(path.partition(":")[0]) if isinstance(path, str) and is_factory_path(path) else None
        source = getattr(module, "__file__", None)
        if source and os.path.isfile(source):
            with open(source, "rb") as handle:
                digests[key] = hashlib.sha256(handle.read()).hexdigest()
    return digests


def load_factory(path: str, flag: str) -> Callable[..., Any]:
    """The function named by MODULE:FUNCTION, imported from the current directory or PYTHONPATH."""
    module_name, _, function_name = path.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name.split(".")[0] and exc.name != module_name:
            raise ConfigError(f"{flag} {path}: importing {module_name} failed: {exc}") from None
        raise ConfigError(
            f"{flag} {path}: no module {module_name!r} in the current directory or on PYTHONPATH"
        ) from None
    except Exception as exc:
        raise ConfigError(f"{flag} {path}: importing {module_name} failed: {type(exc).__name__}: {exc}") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise ConfigError(f"{flag} {path}: module {module_name} has no {function_name!r}")
    if not callable(function):
        raise ConfigError(f"{flag} {path}: {function_name} is a {type(function).__name__}, not a function")
    return function


def call_factory(path: str, flag: str, args: dict[str, Any]) -> Any:
    """The factory called with ``args``; arguments it does not take are refused before the call
    (an error inside the factory is the user's own and keeps its traceback)."""
    function = load_factory(path, flag)
    try:
        inspect.signature(function).bind(**args)
    except TypeError as exc:
        raise ConfigError(f"{flag} {path} does not take these arguments ({exc}); check {flag}-arg / the config") from None
    except ValueError:
        pass  # no signature to check (a builtin): the call will tell
    return function(**args)


def build_user_model(path: str, args: dict[str, Any]) -> nn.Module:
    model = call_factory(path, "--model", args)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {path} returned {type(model).__name__}; a model factory must return a torch.nn.Module")
    return model


def load_user_data(path: str, args: dict[str, Any]) -> UserData:
    returned = call_factory(path, "--dataset", args)
    if not isinstance(returned, (tuple, list)) or len(returned) not in (2, 3):
        what = f"{len(returned)} items" if isinstance(returned, (tuple, list)) else type(returned).__name__
        raise ConfigError(f"--dataset {path} returned {what}; a dataset factory must return (train, val) or (train, val, test)")
    train, val, *rest = returned
    if train is None:
        raise ConfigError(f"--dataset {path} returned no training data (train is None)")
    return UserData(path, train, val, rest[0] if rest else None)


def parse_key_values(pairs: list[str], flag: str) -> dict[str, Any]:
    """--model-arg key=value pairs; values are read as TOML scalars (numbers, true/false, "text"),
    falling back to the plain string, so width=64 is an int and name=gpt a string."""
    import tomllib

    values: dict[str, Any] = {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        if not equals or not key.strip().isidentifier():
            raise ConfigError(f"{flag} expects key=value with a Python name as key, got {pair!r}")
        try:
            values[key.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = text
    return values
