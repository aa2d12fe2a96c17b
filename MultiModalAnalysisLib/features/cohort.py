"""Features over a cohort manifest: one row per case."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from MultiModalAnalysisLib.case import Manifest, read_manifest
from MultiModalAnalysisLib.errors import MissingModalityError
from MultiModalAnalysisLib.features.extract import extract_features
from MultiModalAnalysisLib.features.settings import FeatureSettings, load_settings
from MultiModalAnalysisLib.io import read_image
from MultiModalAnalysisLib.modalities import canonical_modality
from MultiModalAnalysisLib.progress import ProgressCallback, as_progress, check_cancel


def extract_cohort_features(
    manifest: Manifest | str | Path,
    modalities: Sequence[str],
    mask_column: str,
    settings: FeatureSettings | dict | str | Path | None = None,
    device: str | torch.device = "auto",
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
):
    """A table (pandas DataFrame) with ``case_id`` and every case's features.

    Args:
        manifest: a :class:`Manifest` or the path of its CSV.
        modalities: the image columns to use (``CT``, ``PET``, ``MR_T1``...).
        mask_column: the column holding each case's ROI mask.
        settings, device, progress, cancel: as for :func:`extract_features`.
    """
    import pandas as pd

    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    settings = load_settings(settings)
    report = as_progress(progress)
    rows = []
    mask_column = manifest.column(mask_column)
    columns = {canonical_modality(m): manifest.modality_column(m) for m in modalities}
    for number, case_id in enumerate(manifest.case_ids):
        check_cancel(cancel, "cohort feature extraction")
        row = manifest.row(case_id)
        # read directly: extract_features checks the mask itself, more cheaply than a
        # general label-image reader would (it only looks at the voxels that are set)
        images = {
            name: read_image(_path(manifest, row, column, case_id), name=f"{name} of {case_id}")
            for name, column in columns.items()
        }
        mask_path = _path(manifest, row, mask_column, case_id)
        mask = read_image(mask_path, name=f"{mask_column} of {case_id}")
        part = report.sub(number / len(manifest), (number + 1) / len(manifest))
        values = extract_features(images, mask, settings, device, progress=part, cancel=cancel)
        rows.append({"case_id": case_id, **values})
        report((number + 1) / len(manifest), f"case {case_id} done")
    return pd.DataFrame(rows)


def _path(manifest: Manifest, row: dict, column: str, case_id: str) -> Path:
    value = row[column]
    if value is None or (isinstance(value, float) and value != value) or str(value) == "":
        raise MissingModalityError(
            f"case {case_id} in {manifest.path} has no path in column '{column}'."
        )
    return manifest.resolve(value)
