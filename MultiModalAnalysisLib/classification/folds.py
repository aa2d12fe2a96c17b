"""How many stratified folds a (possibly tiny) cohort can take."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from MultiModalAnalysisLib.errors import ConfigError


def usable_folds(requested: int, minority_count: int) -> int:
    """The number of stratified folds such that every fold holds both classes.

    Stratified k-fold puts a minority-class case in every test fold only when there are at
    least k of them, so k is capped at the minority-class count.
    """
    return int(min(requested, minority_count))


def outer_folds(labels: Sequence[int] | np.ndarray, requested: int, what: str) -> tuple[int, str]:
    """Fold count for an evaluation CV over ``labels``, and a note when it had to shrink.

    Raises:
        ConfigError: fewer than two cases of one class: nothing can be cross-validated.
    """
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    if counts.size < 2:
        raise ConfigError(f"{what} holds a single class: a classifier needs both outcomes.")
    minority = int(counts.min())
    if minority < 2:
        raise ConfigError(
            f"{what} has only {minority} case of its rarer class: cross-validation needs at "
            "least 2 (one to train on, one to test). Add cases of that class."
        )
    folds = usable_folds(requested, minority)
    note = ""
    if folds < requested:
        note = (
            f"{requested}-fold CV asked for, but the rarer class has only {minority} cases: "
            f"used {folds} folds so that every test fold holds one"
        )
    return folds, note
