"""The cohort a radiomics classifier reads: a feature table (one row per case).

In this version ``mma train-classifier`` and ``mma classify`` take a FEATURE TABLE: a CSV
with ``case_id``, numeric feature columns (as ``mma features`` writes them:
``<image>_<IBSI tag>``) and, for training, the label column. Non-numeric columns are left
out (and listed), as is a column without a header (a row number that pandas' ``to_csv``
saved). A manifest of image paths (one column per modality and a mask column)
is recognised and routed to :func:`features_from_image_manifest`, which computes the IBSI
features of each case first.
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

from MultiModalAnalysisLib.case import (
    MASK_WORDS,
    Manifest,
    column_list,
    column_modality,
    read_manifest,
)
from MultiModalAnalysisLib.classification.labels import normalise_label
from MultiModalAnalysisLib.errors import ConfigError, ManifestError
from MultiModalAnalysisLib.io import has_image_suffix

log = logging.getLogger(__name__)

# how an excluded case that could not be measured (on_error="skip") is described
UNMEASURED = "could not be measured"
# pandas' name for a column without a header: a row number, as to_csv writes the index by
# default ("Unnamed: 0"; "Unnamed: 0.1" when such a table is saved again)
ROW_NUMBER_COLUMN = re.compile(r"^Unnamed: \d+(\.\d+)?$")
ROW_NUMBER = "a column without a header (a saved row number), never a feature"


@dataclass
class FeatureTable:
    """Numeric features per case (DataFrame indexed by ``case_id``) and optional labels."""

    features: pd.DataFrame
    labels: pd.Series | None = None
    label_column: str | None = None
    source: str = "table"
    dropped_columns: dict[str, str] = field(default_factory=dict)  # column -> why
    excluded_cases: dict[str, str] = field(default_factory=dict)  # case_id -> why
    # how the features were computed from images (image manifests only): modalities,
    # mask column and IBSI settings, stored with a model so it computes them alike later
    extraction: dict[str, Any] | None = None

    @property
    def case_ids(self) -> list[str]:
        return [str(c) for c in self.features.index]

    def __len__(self) -> int:
        return len(self.features)


def image_path_columns(table: pd.DataFrame) -> list[str]:
    """Columns whose values are (mostly) image paths, volume files or DICOM folders: the
    mark of an image manifest.

    Any such column makes the CSV an image manifest (``mma features`` writes no paths into
    its tables), which keeps the rule predictable rather than guessing from the numbers.
    """
    base = table.attrs.get("base_dir")  # (read_manifest sets it)

    def is_image_path(value: str) -> bool:
        if has_image_suffix(value):
            return True
        # a DICOM series is a folder of slices (a volume file or a DICOM folder is an IMAGE)
        path = Path(value).expanduser()
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        return bool(value.strip()) and path.is_dir()

    columns = []
    for column in table.columns:
        if str(column) == "case_id":  # (often also the name of each case's folder)
            continue
        values = table[column].dropna()
        if len(values) and not pd.api.types.is_numeric_dtype(values) and np.mean(
            [is_image_path(str(v)) for v in values]
        ) > 0.5:
            columns.append(str(column))
    return columns


def two_valued_columns(table: pd.DataFrame) -> list[str]:
    """The columns (``case_id`` aside) holding exactly two distinct values: those that can
    serve as a binary classifier's label column."""
    return [str(c) for c in table.columns if str(c) != "case_id"
            and len({normalise_label(v) for v in table[c].dropna()}) == 2]


def _outcome_hint(table: pd.DataFrame, path_columns: Sequence[str] = ()) -> str:
    candidates = [c for c in two_valued_columns(table) if c not in path_columns]
    if candidates:
        return f"columns with two values here: {column_list(candidates, 10)}"
    return ("no column here holds two values: add the outcome column to the table, joined "
            "by case_id")


def check_label_column(
    table: pd.DataFrame, label_column: str, source: str, *, path_columns: Sequence[str] = ()
) -> None:
    """Refuse a label column that cannot hold a binary outcome: absent, ``case_id``, a column
    of image paths, or more than two distinct values.

    Raises:
        ManifestError: naming the column and the columns that could serve.
    """
    if label_column not in table.columns:
        raise ManifestError(f"{source} has no label column '{label_column}' (columns: "
                            f"{column_list(table.columns)}); {_outcome_hint(table, path_columns)}.")
    if label_column == "case_id" or label_column in path_columns:
        what = "the case ids" if label_column == "case_id" else "image paths"
        raise ManifestError(
            f"{source}: the label column '{label_column}' holds {what}, not an outcome; give "
            f"the column of each case's binary outcome ({_outcome_hint(table, path_columns)}).")
    values = sorted({str(normalise_label(v)) for v in table[label_column].dropna()})
    if len(values) > 2:
        raise ManifestError(
            f"{source}: the label column '{label_column}' holds {len(values)} distinct values "
            f"({', '.join(values[:4])}{' ...' if len(values) > 4 else ''}), not a binary "
            f"outcome; give the column of each case's outcome "
            f"({_outcome_hint(table, path_columns)}).")


def check_excluded_columns(table: pd.DataFrame, exclude: Sequence[str], source: str) -> None:
    """Refuse an excluded column the table does not have (a typo would leave the column it
    meant among the features).

    Raises:
        ManifestError: naming the unknown columns and the table's columns.
    """
    missing = [c for c in exclude if c not in table.columns]
    if missing:
        raise ManifestError(
            f"{source} has no column(s) {', '.join(missing)} to exclude (columns: "
            f"{column_list(table.columns)})."
        )


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
        table: one row per case. Columns without a header (``Unnamed: 0``, a row number
            saved by pandas' ``to_csv``) are left out with a warning.
        label_column: the outcome column (required to be present when given); cases with
            no label are excluded and listed.
        exclude: further columns that are not features (e.g. other outcomes).
        feature_pattern: keep only feature columns matching this regular expression.
        source: names the table in messages.

    Raises:
        ManifestError: no ``case_id`` column, a label column that cannot hold a binary
            outcome (see :func:`check_label_column`), unknown excluded column, or no numeric
            feature left.
        ConfigError: a ``feature_pattern`` that is no regular expression, or that matches
            no column.
    """
    if "case_id" not in table.columns:
        raise ManifestError(f"{source} has no 'case_id' column.")
    if label_column is not None:
        check_label_column(table, label_column, source)
    # case_id is never a feature: excluding it as well asks for nothing
    exclude = [c for c in exclude if c != "case_id"]
    check_excluded_columns(table, exclude, source)
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
    # a row number follows the order the table was saved in (often sorted by outcome):
    # as a feature it could carry the label
    row_numbers = [str(c) for c in table.columns if ROW_NUMBER_COLUMN.match(str(c))
                   and c != label_column and c not in dropped]
    if row_numbers:
        log.warning("%s: left out column(s) without a header, %s: a saved row number (pandas' "
                    "to_csv writes its index unless told index=False), which could carry "
                    "the label as a feature.", source, ", ".join(row_numbers))
        dropped.update(dict.fromkeys(row_numbers, ROW_NUMBER))
    candidates = table.drop(columns=[c for c in [label_column, *dropped] if c is not None])
    if feature_pattern:
        pattern = _compiled(feature_pattern)
        matching = [c for c in candidates.columns if pattern.search(str(c))]
        if not matching:
            raise ConfigError(
                f"the feature pattern {feature_pattern!r} matches none of the "
                f"{candidates.shape[1]} candidate column(s) of {source} (e.g. "
                f"{column_list(candidates.columns)}). It is a regular expression searched "
                "in each column name, e.g. 'glcm' or '^CT_.*(firstorder|glszm)'.")
        dropped.update({c: f"does not match {feature_pattern!r}"
                        for c in candidates.columns if c not in set(matching)})
        candidates = candidates[matching]
    numeric = candidates.apply(pd.to_numeric, errors="coerce")
    coerced = []
    for column in candidates.columns:
        if numeric[column].isna().all() and not candidates[column].isna().all():
            dropped[str(column)] = "not numeric"
        elif (numeric[column].isna() & candidates[column].notna()).any():
            coerced.append(str(column))
    if coerced:
        log.warning("%s: non-numeric values in %d feature column(s), read as missing (then "
                    "imputed): %s", source, len(coerced), ", ".join(coerced[:10]))
    features = numeric[[c for c in candidates.columns if c not in dropped]].astype(float)
    if features.shape[1] == 0:
        raise ManifestError(
            f"{source} holds no numeric feature column (columns: "
            f"{column_list(table.columns)}). Give the table written by "
            "`mma features` (case_id, one column per feature, the label column)."
        )
    if dropped:
        log.info("%s: left out %d non-feature column(s): %s", source, len(dropped),
                 ", ".join(list(dropped)[:10]))
    return FeatureTable(features, labels, label_column, source, dropped, excluded)


def _compiled(feature_pattern: str) -> re.Pattern:
    try:
        return re.compile(feature_pattern)
    except re.error as error:
        raise ConfigError(
            f"the feature pattern {feature_pattern!r} is not a regular expression: "
            f"{error}.") from None


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
        ManifestError: unreadable CSV, missing columns, or an image manifest without a
            clear mask column.
        ConfigError: a ``feature_pattern`` that is no regular expression, or that matches
            no column.
    """
    if feature_pattern:
        _compiled(feature_pattern)  # before any image of a manifest is read
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


def _is_mask_column(column: str) -> bool:
    return any(word in column.lower() for word in MASK_WORDS)


def _mask_modality(column: str) -> str | None:
    """The modality a mask column is named after (``CT_mask`` -> ``CT``, ``PET-seg`` ->
    ``PET``), or None (``mask``)."""
    words = "|".join(MASK_WORDS)
    stem = re.sub(rf"[_\-\s]*({words})$", "", column, flags=re.IGNORECASE)
    return column_modality(stem) if stem and stem != column else None


def default_mask_column(manifest: Manifest, modalities: Sequence[str] | None = None) -> str:
    """The ROI column of an image manifest: ``mask`` if present, else its only mask-like
    path column (``CT_mask``, ``GTV_label``, ...), else, of several, the mask of the first
    image modality used (``CT_mask`` for ``CT``; logged, with how to choose another).

    Args:
        manifest: the image manifest.
        modalities: the image columns used, in order (default: the manifest's path columns
            that are not masks, in column order).

    Raises:
        ManifestError: no mask column, or several with none named after the first modality
            (named in the message).
    """
    paths = image_path_columns(manifest.table)
    candidates = [c for c in paths if c.lower() == "mask"] or [
        c for c in paths if _is_mask_column(c)]
    if len(candidates) == 1:
        return candidates[0]
    if modalities is None:
        modalities = [c for c in paths if not _is_mask_column(c)]
    first = column_modality(modalities[0]) if modalities else None
    paired = [c for c in candidates if first is not None and _mask_modality(c) == first]
    if len(paired) == 1:
        others = [c for c in candidates if c != paired[0]]
        log.info("%s: the region of interest is %s, the mask of the first image modality "
                 "(%s); to use another, give --mask-column (mask_column=) %s.", manifest.path,
                 paired[0], first, " or ".join(others))
        return paired[0]
    raise ManifestError(
        f"{manifest.path} is a manifest of image paths; say which column holds the region "
        f"of interest (--mask-column / mask_column="
        f"{'one of ' + ', '.join(candidates) if candidates else 'a column of masks'})."
    )


def features_from_image_manifest(
    manifest: Manifest,
    label_column: str | None = None,
    *,
    exclude: Sequence[str] = (),
    feature_pattern: str | None = None,
    modalities: Sequence[str] | None = None,
    mask_column: str | None = None,
    feature_settings: Any = None,
    device: str = "auto",
    progress: Any = None,
    cancel: Any = None,
    on_error: str = "stop",
) -> FeatureTable:
    """Features for a manifest of IMAGE PATHS (+ a mask column): the single place where the
    radiomics extractor is called for a classifier.

    Each case's images and mask are read, :func:`features.extract_features` computes the
    IBSI features of every image inside the mask (columns ``<image>_<IBSI tag>``, as
    ``mma features`` writes them), and the label and other non-path columns of the manifest
    are carried over.

    Args:
        manifest: the image manifest (``case_id``, one path column per modality, a mask
            column, the label column).
        label_column, exclude, feature_pattern: see :func:`feature_table_from_frame`.
        modalities: the image columns to use (default: every path column that is not a mask).
        mask_column: the ROI column (default: see :func:`default_mask_column`).
        feature_settings: IBSI settings (:class:`features.FeatureSettings`, dict or file).
        device, progress, cancel: as for :func:`features.extract_features`.
        on_error: a case that cannot be read or measured stops the run ("stop") or is left
            out with a warning ("skip"; listed in ``excluded_cases`` with its error), as in
            :func:`features.extract_cohort_features`.

    Raises:
        ManifestError: no mask column (or several, none of the first modality), no image
            column, a label column that cannot hold a binary outcome, an excluded column
            the manifest does not have (all checked before any image is read).
    """
    from MultiModalAnalysisLib.features import extract_cohort_features

    table = manifest.table
    paths = image_path_columns(table)
    # checked before the (long) feature extraction
    if label_column is not None:
        check_label_column(table, label_column, str(manifest.path), path_columns=paths)
    check_excluded_columns(table, exclude, str(manifest.path))
    exclude = [c for c in exclude if c not in paths]  # path columns are never features
    if mask_column is None:
        mask_column = default_mask_column(manifest, modalities)
    if modalities is None:
        modalities = [c for c in paths if c != mask_column and not _is_mask_column(c)]
    modalities = [str(m).strip() for m in modalities if str(m).strip()]
    if not modalities:
        raise ManifestError(
            f"{manifest.path} has no image column besides the mask '{mask_column}'; give the "
            "modalities (--modalities CT,PET)."
        )
    log.info("%s: computing the features of %s inside %s for %d case(s)", manifest.path,
             ", ".join(modalities), mask_column, len(manifest.case_ids))
    frame = extract_cohort_features(manifest, modalities, mask_column, feature_settings,
                                    device, progress, cancel, on_error=on_error, units="error")
    failed = dict(frame.attrs.get("failed", {}))
    carried = [c for c in table.columns
               if c != "case_id" and c not in paths and c not in frame.columns]
    if carried:
        extra = table[["case_id", *carried]].copy()
        extra["case_id"] = extra["case_id"].astype(str).str.strip()
        frame = frame.merge(extra, on="case_id", how="left")
    not_features = [c for c in carried if c != label_column and c not in exclude]
    result = feature_table_from_frame(
        frame, label_column, exclude=[*exclude, *not_features], feature_pattern=feature_pattern,
        source=f"{manifest.path} (features of {', '.join(modalities)} in {mask_column})",
    )
    result.excluded_cases.update(
        {case_id: f"{UNMEASURED} ({error})" for case_id, error in failed.items()})
    result.extraction = {"modalities": list(modalities), "mask_column": mask_column,
                         "feature_settings": _settings_dict(feature_settings)}
    return result


def _settings_dict(settings: Any) -> dict[str, Any]:
    from MultiModalAnalysisLib.features import load_settings

    return load_settings(settings).to_dict()
