"""Features over a cohort manifest: one row per case."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from MultiModalAnalysisLib.case import Manifest, read_manifest
from MultiModalAnalysisLib.features.extract import extract_features
from MultiModalAnalysisLib.features.settings import FeatureSettings, load_settings
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
    for number, case_id in enumerate(manifest.case_ids):
        check_cancel(cancel, "cohort feature extraction")
        case = manifest.load_case(case_id, modalities, [mask_column])
        part = report.sub(number / len(manifest), (number + 1) / len(manifest))
        images = {canonical_modality(m): case.image(m) for m in modalities}
        values = extract_features(
            images, case.mask(mask_column), settings, device, progress=part, cancel=cancel
        )
        rows.append({"case_id": case_id, **values})
        report((number + 1) / len(manifest), f"case {case_id} done")
    return pd.DataFrame(rows)
