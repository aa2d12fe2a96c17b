"""Binary outcome labels: any two values (0/1, True/False, "no"/"yes") to 0/1."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from MultiModalAnalysisLib.errors import ConfigError

log = logging.getLogger(__name__)

# Text label pairs whose sort order names the positive class as a reader expects (the later
# one): any other pair is warned about when no positive label is given.
OBVIOUS_PAIRS = [{"no", "yes"}, {"false", "true"}, {"negative", "positive"}, {"n", "y"},
                 {"absent", "present"}]


def normalise_label(value: Any) -> Any:
    """1.0 -> 1 and "1.0" -> 1 (a CSV column with a gap reads as float), numpy scalars ->
    Python."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def encode_labels(
    values: Sequence[Any] | np.ndarray, positive_label: Any = None, *, what: str = "labels"
) -> tuple[np.ndarray, list[str]]:
    """Map two label values to 0 (negative) and 1 (positive).

    Args:
        values: one label per case; no missing values.
        positive_label: the value meaning "positive"; default: the larger in sort order
            (1 of 0/1, True of False, "yes" of "no").
        what: names the labels in messages.

    Returns:
        (0/1 array, [negative name, positive name]).

    Raises:
        ConfigError: not exactly two distinct values, or ``positive_label`` not among them.
    """
    normalised = [normalise_label(v) for v in np.asarray(values, dtype=object)]
    missing = sum(v is None or (isinstance(v, float) and np.isnan(v)) for v in normalised)
    if missing:
        raise ConfigError(
            f"{what}: {missing} case(s) have no label. Remove them or fill in their outcome."
        )
    distinct = sorted(set(normalised), key=lambda v: (str(type(v)), v))
    if len(distinct) != 2:
        raise ConfigError(
            f"{what} must hold exactly two outcome values for a binary classifier; found "
            f"{len(distinct)}: {distinct[:6]}."
        )
    if positive_label is None:
        positive = distinct[1]
        if all(isinstance(v, str) for v in distinct) and {
                str(v).strip().lower() for v in distinct} not in OBVIOUS_PAIRS:
            log.warning("%s: the positive class is taken to be %r, the later of %r and %r in "
                        "sort order; give the positive label (--positive-label) if it is the "
                        "other.", what, distinct[1], distinct[0], distinct[1])
    else:
        positive = normalise_label(positive_label)
        if positive not in distinct and str(positive) in map(str, distinct):
            positive = next(v for v in distinct if str(v) == str(positive))
        if positive not in distinct:
            raise ConfigError(
                f"positive label {positive_label!r} is not one of {what}' values {distinct}."
            )
    negative = distinct[0] if positive == distinct[1] else distinct[1]
    encoded = np.array([1 if v == positive else 0 for v in normalised], dtype=int)
    return encoded, [str(negative), str(positive)]
