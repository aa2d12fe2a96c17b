"""Checks of the numbers and switches a user gives (API options, settings files): each
returns the value in its proper type, or raises ``ConfigError`` naming the setting and what
it takes, instead of a library's traceback or a silently odd result (NaN, a string read as
true)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from MultiModalAnalysisLib.errors import ConfigError


def number(name: str, value: Any) -> float:
    """``value`` as a float (a numeric string too); booleans and non-numbers refused."""
    if isinstance(value, bool | np.bool_):
        raise ConfigError(f"{name} must be a number, not {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, not {value!r}.") from None


def finite(name: str, value: Any, least: float = -math.inf, most: float = math.inf) -> float:
    """``value`` as a finite float from ``least`` to ``most`` (NaN refused)."""
    result = number(name, value)
    if not (math.isfinite(result) and least <= result <= most):
        bounds = ("" if least == -math.inf and most == math.inf else
                  f" >= {least:g}" if most == math.inf else
                  f" <= {most:g}" if least == -math.inf else f" from {least:g} to {most:g}")
        raise ConfigError(f"{name} must be a finite number{bounds}, not {value!r}.")
    return result


def whole(name: str, value: Any, least: int, most: int | float = math.inf) -> int:
    """``value`` as an int from ``least`` to ``most``, refusing fractions, NaN and booleans."""
    result = number(name, value)
    if not (math.isfinite(result) and result == int(result) and least <= result <= most):
        span = f"from {least} to {most}" if most != math.inf else f">= {least}"
        raise ConfigError(f"{name} must be a whole number {span}, not {value!r}.")
    return int(result)


def flag(name: str, value: Any) -> bool:
    """``value`` as a bool: only ``True``/``False`` (a string such as "no" is refused, not
    read as true)."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise ConfigError(f"{name} must be True or False, not {value!r}.")
