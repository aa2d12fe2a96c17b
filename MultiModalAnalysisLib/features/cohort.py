"""Features over a cohort manifest: one row per case."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
    cases = _read_ahead(manifest, columns, mask_column)
    try:
        for number, (case_id, images, mask) in enumerate(cases):
            check_cancel(cancel, "cohort feature extraction")
            part = report.sub(number / len(manifest), (number + 1) / len(manifest))
            values = extract_features(images, mask, settings, device, progress=part, cancel=cancel)
            rows.append({"case_id": case_id, **values})
            report((number + 1) / len(manifest), f"case {case_id} done")
    finally:
        cases.close()
    return pd.DataFrame(rows)


READ_AHEAD = 2
"""Cases read in the background while the current one is extracted (SimpleITK releases the
interpreter lock while it reads, so decompressing the next NIfTI files overlaps with the
extraction; the bound keeps at most this many cases' images in memory besides the
current one)."""


def _read_ahead(
    manifest: Manifest, columns: dict[str, str], mask_column: str
) -> Iterator[tuple[str, dict, object]]:
    """(case_id, images, mask) in manifest order, the next cases read in a background thread.

    A reading error (a missing file, an unreadable image) is raised when its case's turn
    comes, as a plain loop would raise it; cases after it are not waited for.
    """

    def read(case_id: str):
        row = manifest.row(case_id)
        # read directly: extract_features checks the mask itself, more cheaply than a
        # general label-image reader would (it only looks at the voxels that are set)
        images = {
            name: read_image(_path(manifest, row, column, case_id), name=f"{name} of {case_id}")
            for name, column in columns.items()
        }
        mask = read_image(
            _path(manifest, row, mask_column, case_id), name=f"{mask_column} of {case_id}"
        )
        return case_id, images, mask

    case_ids = list(manifest.case_ids)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mma-read-ahead")
    pending: list[Future] = []
    try:
        for case_id in case_ids[: READ_AHEAD + 1]:
            pending.append(pool.submit(read, case_id))
        following = iter(case_ids[READ_AHEAD + 1 :])
        while pending:
            result = pending.pop(0).result()
            nxt = next(following, None)
            if nxt is not None:
                pending.append(pool.submit(read, nxt))
            yield result
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _path(manifest: Manifest, row: dict, column: str, case_id: str) -> Path:
    value = row[column]
    if value is None or (isinstance(value, float) and value != value) or str(value) == "":
        raise MissingModalityError(
            f"case {case_id} in {manifest.path} has no path in column '{column}'."
        )
    return manifest.resolve(value)
