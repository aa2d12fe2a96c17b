"""Binary outcome labels: any two values (0/1, True/False, "no"/"yes") to 0/1."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

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


def _ids(ids: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f" ... ({len(ids)} in all)" if len(ids) > limit else "")


def _positional(index: pd.Index) -> bool:
    """A default 0..n-1 index: row numbers, not case ids."""
    return isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1


def align_labels(features: Any, labels: Any, *, what: str = "the labels") -> Any:
    """The labels in the order of the feature rows: matched by case id where both carry one.

    A pandas Series of labels is matched to a DataFrame of features by index (case id,
    compared as text), whatever the order of either. Anything else (a list, an array, a
    Series numbered 0..n-1 beside features indexed by case id, features that are an array)
    pairs by position, as given.

    Raises:
        ConfigError: a case id duplicated, or present on one side only (named).
    """
    if not (isinstance(labels, pd.Series) and isinstance(features, pd.DataFrame)):
        return labels
    if labels.index.equals(features.index):
        return labels
    rows = pd.Index(map(str, features.index))
    ids = pd.Index(map(str, labels.index))
    if _positional(labels.index) and set(rows) != set(ids):
        return labels  # a Series without case ids: by position, as a list would be
    for side, index in (("features", rows), (what, ids)):
        if index.has_duplicates:
            raise ConfigError(
                f"{side} name some cases twice ({_ids(list(index[index.duplicated()]))}): "
                "give one row per case id to match the labels to the features.")
    no_label = [c for c in rows if c not in set(ids)]
    no_features = [c for c in ids if c not in set(rows)]
    if no_label or no_features:
        raise ConfigError(
            f"{what} and the features name different cases (matched by case id, the "
            "index of each): "
            + "; ".join(
                [f"{len(no_label)} case(s) with features have no label: {_ids(no_label)}"]
                * bool(no_label)
                + [f"{len(no_features)} labelled case(s) have no features: "
                   f"{_ids(no_features)}"] * bool(no_features))
            + ". Give a label for each feature row (or plain values, paired by position).")
    aligned = pd.Series(labels.to_numpy(), index=ids).reindex(rows)
    aligned.index = features.index
    aligned.name = labels.name
    return aligned


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
