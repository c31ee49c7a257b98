"""One-line checks of single values (a positive lr, a fraction in (0, 1), a choice from a list)
and the short quoting of a value in an error message.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

from trainkit.config.names import MAX_FLOAT_SETTING, MAX_SHOWN_CHARS, flag_name
from trainkit.errors import ConfigError


# --------------------------------------------------------------- value checks
def require_choice(name: str, value: str, choices: tuple[str, ...], more: str = "") -> None:
    if value not in choices:
        raise ConfigError(f"{flag_name(name)} must be one of {', '.join(choices)}{' ' + more if more else ''}; "
                          f"got {short_repr(value)}")


def is_factory_path(value: str) -> bool:
    """MODULE:FUNCTION (a user's model or dataset factory), as opposed to a trainkit name."""
    module, colon, function = value.partition(":")
    return bool(colon and module and function)


def require_positive(name: str, value: float) -> None:
    if not 0 < value <= MAX_FLOAT_SETTING:  # NaN fails too
        raise ConfigError(f"{flag_name(name)} must be a positive finite number, got {value}{_float32_note(value)}")


def require_non_negative(name: str, value: float) -> None:
    if not 0 <= value <= MAX_FLOAT_SETTING:
        raise ConfigError(f"{flag_name(name)} must be a finite number >= 0, got {value}{_float32_note(value)}")


def _float32_note(value: float) -> str:
    """Why a finite number beyond MAX_FLOAT_SETTING is refused (it is finite in Python, not in training)."""
    if math.isfinite(value) and value > MAX_FLOAT_SETTING:
        return f" (at most {MAX_FLOAT_SETTING:.2g}: training computes with it in float32, where more overflows)"
    return ""


def require_open_unit_interval(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{flag_name(name)} must be in (0, 1), got {value}")


def require_in_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{flag_name(name)} must be in [0, 1), got {value}")


def require_int_at_least(name: str, value: int | None, minimum: int) -> None:
    """Types are checked already; None means 'the default' for the optional fields."""
    if value is not None and value < minimum:
        raise ConfigError(f"{flag_name(name)} must be an integer >= {minimum}, got {value}")


def epochs(values: list[float]) -> str:
    return shorten(",".join(f"{v:g}" for v in values))


def one_line(exc: BaseException) -> str:
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
    return shorten(_SHORT_REPR.repr(value))


def shorten(text: str) -> str:
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 1] + "…"
