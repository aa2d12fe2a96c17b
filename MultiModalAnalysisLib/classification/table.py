"""The cohort a radiomics classifier reads: a feature table (one row per case).

In this version ``mma train-classifier`` and ``mma classify`` take a FEATURE TABLE: a CSV
with ``case_id``, numeric feature columns (as ``mma features`` writes them:
``<image>_<IBSI tag>``) and, for training, the label column. Non-numeric columns are left
out (and listed). A manifest of image paths is recognised and routed to
:func:`features_from_image_manifest`, the single place where image manifests will be
turned into features.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from MultiModalAnalysisLib.case import Manifest, read_manifest
from MultiModalAnalysisLib.errors import ManifestError
from MultiModalAnalysisLib.io import has_image_suffix

log = logging.getLogger(__name__)


@dataclass
class FeatureTable:
    """Numeric features per case (DataFrame indexed by ``case_id``) and optional labels."""

    features: pd.DataFrame
    labels: pd.Series | None = None
    label_column: str | None = None
    source: str = "table"
    dropped_columns: dict[str, str] = field(default_factory=dict)  # column -> why
    excluded_cases: dict[str, str] = field(default_factory=dict)  # case_id -> why

    @property
    def case_ids(self) -> list[str]:
        return [str(c) for c in self.features.index]

    def __len__(self) -> int:
        return len(self.features)


def image_path_columns(table: pd.DataFrame) -> list[str]:
    """Columns whose values are (mostly) image file paths: the mark of an image manifest.

    Any such column makes the CSV an image manifest (``mma features`` writes no paths into
    its tables), which keeps the rule predictable rather than guessing from the numbers.
    """
    columns = []
    for column in table.columns:
        values = table[column].dropna()
        if len(values) and not pd.api.types.is_numeric_dtype(values) and np.mean(
            [has_image_suffix(str(v)) for v in values]
        ) > 0.5:
            columns.append(str(column))
    return columns


def feature_table_from_frame(
    table: pd.DataFrame,
    label_column: str | None = None,
    *,
    exclude: Sequence[str] = (),
    feature_pattern: str | None = None,
    source: str = "table",
) -> FeatureTable:
    """Split a DataFrame with ``case_id`` into numeric features and labels.

    Args:
        table: one row per case.
        label_column: the outcome column (required to be present when given); cases with
            no label are excluded and listed.
        exclude: further columns that are not features (e.g. other outcomes).
        feature_pattern: keep only feature columns matching this regular expression.
        source: names the table in messages.

    Raises:
        ManifestError: no ``case_id`` or label column, unknown excluded column, or no
            numeric feature left.
    """
    if "case_id" not in table.columns:
        raise ManifestError(f"{source} has no 'case_id' column.")
    missing = [c for c in [label_column, *exclude] if c is not None and c not in table.columns]
    if missing:
        raise ManifestError(
            f"{source} has no column(s) {', '.join(missing)} (columns: "
            f"{', '.join(map(str, table.columns[:20]))}{' ...' if table.shape[1] > 20 else ''})."
        )
    table = table.set_index(table["case_id"].astype(str).str.strip()).drop(columns="case_id")
    table.index.name = "case_id"
    excluded: dict[str, str] = {}
    labels = None
    if label_column is not None:
        labels = table[label_column]
        unlabelled = labels.isna()
        excluded = {str(c): f"no {label_column} value" for c in table.index[unlabelled]}
        table, labels = table[~unlabelled], labels[~unlabelled]
    dropped: dict[str, str] = dict.fromkeys(exclude, "excluded by the user")
    candidates = table.drop(columns=[c for c in [label_column, *exclude] if c is not None])
    if feature_pattern:
        pattern = re.compile(feature_pattern)
        dropped.update({c: f"does not match {feature_pattern!r}"
                        for c in candidates.columns if not pattern.search(str(c))})
        candidates = candidates[[c for c in candidates.columns if pattern.search(str(c))]]
    numeric = candidates.apply(pd.to_numeric, errors="coerce")
    for column in candidates.columns:
        if numeric[column].isna().all() and not candidates[column].isna().all():
            dropped[str(column)] = "not numeric"
    features = numeric[[c for c in candidates.columns if c not in dropped]].astype(float)
    if features.shape[1] == 0:
        raise ManifestError(
            f"{source} holds no numeric feature column (columns: "
            f"{', '.join(map(str, table.columns[:20]))}). Give the table written by "
            "`mma features` (case_id, one column per feature, the label column)."
        )
    if dropped:
        log.info("%s: left out %d non-feature column(s): %s", source, len(dropped),
                 ", ".join(list(dropped)[:10]))
    return FeatureTable(features, labels, label_column, source, dropped, excluded)


def read_feature_table(
    path: str | Path,
    label_column: str | None = None,
    *,
    exclude: Sequence[str] = (),
    feature_pattern: str | None = None,
    **extraction: Any,
) -> FeatureTable:
    """Read a cohort CSV as a feature table (see the module docstring).

    Args:
        path: the CSV (``case_id``, features, label).
        label_column, exclude, feature_pattern: see :func:`feature_table_from_frame`.
        extraction: options for :func:`features_from_image_manifest` (image manifests).

    Raises:
        ManifestError: unreadable CSV, missing columns, or an image manifest (for now).
    """
    manifest = read_manifest(path)
    if image_path_columns(manifest.table):
        return features_from_image_manifest(
            manifest, label_column, exclude=exclude, feature_pattern=feature_pattern,
            **extraction,
        )
    return feature_table_from_frame(
        manifest.table, label_column, exclude=exclude, feature_pattern=feature_pattern,
        source=str(manifest.path),
    )


def features_from_image_manifest(
    manifest: Manifest, label_column: str | None = None, **options: Any
) -> FeatureTable:
    """Features for a manifest of IMAGE PATHS (+ a mask column): the single place where the
    radiomics extractor will be called.

    To come (once ``MultiModalAnalysisLib.features`` is part of the engine): for each case,
    ``manifest.load_case(case_id, modalities, [mask_column])``, then
    ``features.extract_features(case.images, case.mask(mask_column), settings)``, one row
    per case, then :func:`feature_table_from_frame` on the result plus the label column.
    Until then an image manifest is refused with a message saying what to do.

    Raises:
        ManifestError: always, for now.
    """
    columns = image_path_columns(manifest.table)
    raise ManifestError(
        f"{manifest.path} is a manifest of image paths (columns {', '.join(columns)}); this "
        "command takes a feature table: case_id, one numeric column per feature (as written "
        "by `mma features`) and the label column. Compute the features first with "
        "`mma features`, then pass that CSV."
    )
