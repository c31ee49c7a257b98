"""Settings from files and dicts: TOML/YAML/JSON config files read with limits (size, depth,
duplicate keys, no YAML tags that build objects), each value's type checked against the
TrainConfig field it sets, and the recipes' defaults applied.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomllib
import torch
import yaml

from trainkit.config.names import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_VALUES,
    OFF_WHEN_ZERO,
    TEXT_DEFAULT_MODEL,
    TEXT_LOOP_RECIPE,
    TEXT_RECIPES,
)  # fmt: skip
from trainkit.config.schema import TrainConfig, check_field_types, kind_of
from trainkit.config.sections import flat_settings
from trainkit.config.values import one_line, short_repr, shorten
from trainkit.devices import fast_bf16, resolve_device
from trainkit.errors import ConfigError


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
        raise ConfigError(f"{source}: expected a mapping of settings, got {kind_of(values)}")
    values = flat_settings(values, source)  # [optim] lr = ... is lr = ...
    bad_keys = [key for key in values if not isinstance(key, str)]
    if bad_keys:
        raise ConfigError(f"{source}: setting names must be strings, got {short_repr(bad_keys[0])}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    normalised = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(normalised) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting(s) {shorten(', '.join(unknown))}; valid settings: {', '.join(sorted(known))}"
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
        raise ConfigError(f"{what} {path} is not valid YAML: {one_line(exc)}") from None
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
