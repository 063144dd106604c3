"""Errors a person can cause and fix, which the commands print as one line ``error: <message>`` (anything else is a
bug and keeps its traceback), and the checks constructors share, e.g. ``model.K=0 is not allowed: it must be an
integer ≥ 1``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class UserError(Exception):
    """A problem with the user's input, explained in one message."""


class ConfigError(UserError, ValueError):
    """A configuration value is not allowed; the message names the key, the value and what is allowed."""


class DataError(UserError):
    """A dataset is missing, empty or corrupt; the message names the file or folder."""


class CheckpointError(UserError):
    """A checkpoint is missing, unsafe, corrupt or belongs to another model configuration."""


def _refuse(key: str, value: Any, what: str, allow_none: bool) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed: it must be {what}{' (or null)' if allow_none else ''}")


def check_int(key: str, value: Any, minimum: int | None = None, maximum: int | None = None, *,
              allow_none: bool = False) -> int | None:
    """``value`` if it is an integer in [minimum, maximum] (or None when allowed), else ConfigError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum) \
            or (maximum is not None and value > maximum):
        bounds = (f"from {minimum} to {maximum}" if minimum is not None and maximum is not None
                  else f"≥ {minimum}" if minimum is not None else f"≤ {maximum}" if maximum is not None else "")
        raise _refuse(key, value, f"an integer {bounds}".strip(), allow_none)
    return value


def check_number(key: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> float | None:
    """``value`` as a float if it is a finite number within the bounds (or None when allowed), else ConfigError."""
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        bounds = [f"{'>' if low_open else '≥'} {low:g}"] if low is not None else []
        bounds += [f"{'<' if high_open else '≤'} {high:g}"] if high is not None else []
        raise _refuse(key, value, " ".join(["a finite number", " and ".join(bounds)]).strip(), allow_none)
    return float(value)


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _refuse(key, value, "true or false", False)
    return value


def check_choice(key: str, value: Any, allowed: Iterable) -> Any:
    allowed = list(allowed)
    if isinstance(value, bool) or value not in allowed:
        raise ConfigError(f"{key}={value!r} is unknown; allowed: {', '.join(map(str, allowed))}")
    return value
