"""The search space file of `trainkit tune`: one table per setting, in Optuna's own terms.

```toml
[lr]                  # low/high, optionally log = true or step = ...
low = 1e-4
high = 1e-1
log = true

[batch_size]          # or a list of choices (lists such as hidden widths too)
choices = [64, 128, 256]

[model_args.width]    # a MODULE:FUNCTION model's keyword argument (dataset_args likewise)
low = 32
high = 256
step = 32
```

A range is an integer range when its setting is an integer (``batch_size``, ``epochs``) or, for a
factory's argument, when both bounds are integers; otherwise a float range. Everything is checked
against the base settings before any trial runs: an unknown setting, an impossible range or a
value the setting refuses is one line naming the table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainkit.config.files import recipe_config
from trainkit.config.schema import field_types, setting_accepts
from trainkit.config.names import flag_name
from trainkit.config.values import is_factory_path
from trainkit.errors import ConfigError

SPACE_KEYS = ("low", "high", "log", "step", "choices")
FACTORY_TABLES = ("model_args", "dataset_args")  # [model_args.NAME]: a keyword argument of the user's factory
# Where and how a trial runs, or the objective itself: not hyper-parameters.
UNTUNABLE = ("out", "monitor", "monitor_mode", "device", "strategy", "data_dir", "data_file", "threads", "plots")
SCALAR_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class Dimension:
    """One setting of the space: its name ('lr', 'model_args.width'), the range or choices
    Optuna samples from, and how a sampled value becomes the setting's value."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False
    choices: tuple[Any, ...] = ()

    def distribution(self) -> Any:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices:
            return CategoricalDistribution([choice_label(choice) for choice in self.choices])
        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def value(self, sampled: Any) -> Any:
        """The setting's value for what Optuna sampled (a list choice travels as its JSON label)."""
        if self.choices:
            return next(choice for choice in self.choices if choice_label(choice) == sampled)
        return sampled

    def grid(self) -> list[Any]:
        """Every value, for --sampler grid: choices, or a range with a step."""
        if self.choices:
            return [choice_label(choice) for choice in self.choices]
        if self.log or (self.step is None and not self.integer):
            raise ConfigError(f"--sampler grid needs choices or a step for every setting; [{self.name}] is a "
                              f"continuous range: add step = ... or list choices")  # fmt: skip
        step = self.step or 1
        count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + index * step for index in range(count)]
        return [int(v) for v in values] if self.integer else [round(v, 12) for v in values]

    def extremes(self) -> list[Any]:
        """The values checked against the base settings before any trial."""
        return list(self.choices) if self.choices else [self.low, self.high]


def choice_label(choice: Any) -> Any:
    """Optuna's choices are scalars: a list choice (hidden = [512, 256]) is named by its JSON text."""
    return choice if choice is None or isinstance(choice, SCALAR_TYPES) else json.dumps(choice)


def parse_space(raw: Mapping[str, Any], base: Mapping[str, Any], source: str = "--space") -> list[Dimension]:
    """The dimensions of a space file, each checked against the base settings (see the module doc)."""
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{source} names no setting to tune; give one table per setting, e.g. [lr] low = 1e-4 high = 0.1")
    settings = field_types()
    dimensions = []
    for name, table in raw.items():
        if name in FACTORY_TABLES:
            dimensions += factory_dimensions(name, table, base, source)
            continue
        if name not in settings:
            known = ", ".join(sorted(settings))
            raise ConfigError(f"{source}: [{name}] is not a trainkit setting; tune one of {known} (or [model_args.NAME])")
        if name in UNTUNABLE:
            raise ConfigError(f"{source}: [{name}] says where or how trials run, not how they train; set it in "
                              f"the base settings instead")  # fmt: skip
        dimensions.append(parse_dimension(name, table, source, name))
    for dimension in dimensions:
        check_against_base(dimension, base, source)
    return dimensions


def factory_dimensions(table_name: str, tables: Any, base: Mapping[str, Any], source: str) -> list[Dimension]:
    owner = "model" if table_name == "model_args" else "dataset"
    if not is_factory_path(str(base.get(owner, ""))):
        raise ConfigError(f"{source}: [{table_name}.*] are the keyword arguments of a MODULE:FUNCTION {owner}; "
                          f"--{owner} {base.get(owner, 'mlp' if owner == 'model' else 'mnist')} has none")  # fmt: skip
    if not isinstance(tables, Mapping) or not tables:
        raise ConfigError(f"{source}: [{table_name}] must hold one table per argument, e.g. [{table_name}.width]")
    return [parse_dimension(f"{table_name}.{arg}", table, source, None) for arg, table in tables.items()]


def parse_dimension(name: str, table: Any, source: str, setting: str | None) -> Dimension:
    """A table's range or choices; ``setting`` is the TrainConfig field (None: a factory's argument)."""
    where = f"{source}: [{name}]"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table with low/high or choices, got {table!r}")
    unknown = sorted(set(table) - set(SPACE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; use {', '.join(SPACE_KEYS)}")
    if "choices" in table:
        if set(table) != {"choices"}:
            raise ConfigError(f"{where}: give choices or low/high, not both")
        return parse_choices(name, table["choices"], where)
    return parse_range(name, table, where, setting)


def parse_choices(name: str, choices: Any, where: str) -> Dimension:
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}: choices must be a non-empty list, got {choices!r}")
    labels = [choice_label(choice) for choice in choices]
    if len(set(map(repr, labels))) != len(labels):
        raise ConfigError(f"{where}: choices {choices!r} name a value twice")
    return Dimension(name, choices=tuple(choices))


def parse_range(name: str, table: Mapping[str, Any], where: str, setting: str | None) -> Dimension:
    low, high, log, step = table.get("low"), table.get("high"), table.get("log", False), table.get("step")
    if low is None or high is None:
        raise ConfigError(f"{where} needs both low and high (or choices = [...])")
    for key, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    integer = range_is_integer(low, high, step, where, setting)
    if low >= high:
        raise ConfigError(f"{where}: low {low} must be below high {high}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
    if log and step is not None:
        raise ConfigError(f"{where}: a range is either log or stepped, not both (Optuna samples neither way then)")
    if step is not None and not 0 < step <= high - low:
        raise ConfigError(f"{where}: step must be positive and at most high - low = {high - low}, got {step}")
    return Dimension(name, low=low, high=high, log=log, step=step, integer=integer)


def range_is_integer(low: float, high: float, step: float | None, where: str, setting: str | None) -> bool:
    """An integer setting needs integer bounds; a float setting takes any; a factory's argument is
    an integer when its bounds (and step) are."""
    all_ints = all(isinstance(v, int) for v in (low, high, step) if v is not None)
    if setting is None:
        return all_ints
    if setting_accepts(setting, 0.5):
        return False
    if setting_accepts(setting, 1):
        if not all_ints:
            raise ConfigError(f"{where}: {flag_name(setting)} is an integer setting; give integer low/high/step")
        return True
    raise ConfigError(f"{where}: {flag_name(setting)} is not a number; list its values as choices = [...]")


def check_against_base(dimension: Dimension, base: Mapping[str, Any], source: str) -> None:
    """Each choice (or both ends of a range) must make a valid run with the base settings."""
    if "." in dimension.name:
        return  # a factory's argument: the factory itself checks it when the trial builds it
    for value in dimension.extremes():
        try:
            recipe_config({**base, dimension.name: value}, source=source).resolved()
        except ConfigError as exc:
            raise ConfigError(f"{source}: [{dimension.name}] {value!r} cannot run with the base settings: {exc}") from None


def trial_settings(base: Mapping[str, Any], dimensions: list[Dimension], params: Mapping[str, Any]) -> dict[str, Any]:
    """The base settings with a trial's sampled values in place (factory arguments merged into their table)."""
    settings = dict(base)
    for dimension in dimensions:
        value = dimension.value(params[dimension.name])
        table, dot, argument = dimension.name.partition(".")
        if dot:
            settings[table] = {**settings.get(table, {}), argument: value}
        else:
            settings[dimension.name] = value
    return settings


def grid_space(dimensions: list[Dimension]) -> dict[str, list[Any]]:
    return {dimension.name: dimension.grid() for dimension in dimensions}
