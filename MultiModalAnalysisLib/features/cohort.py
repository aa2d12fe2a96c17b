"""Features over a cohort manifest: one row per case."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from MultiModalAnalysisLib.case import Manifest, read_manifest
from MultiModalAnalysisLib.errors import (
    ConfigError,
    MissingModalityError,
    MMAError,
    UnitsError,
    for_case,
)
from MultiModalAnalysisLib.features.extract import extract_features
from MultiModalAnalysisLib.features.settings import FeatureSettings, load_settings
from MultiModalAnalysisLib.images import (
    require_non_constant,
    require_plausible_units,
    select_label,
)
from MultiModalAnalysisLib.io import read_image
from MultiModalAnalysisLib.modalities import canonical_modality
from MultiModalAnalysisLib.progress import ProgressCallback, as_progress, check_cancel

log = logging.getLogger(__name__)


def extract_cohort_features(
    manifest: Manifest | str | Path,
    modalities: Sequence[str],
    mask_column: str,
    settings: FeatureSettings | dict | str | Path | None = None,
    device: str | torch.device = "auto",
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    on_error: str = "stop",
    label: int | None = None,
    units: str = "warn",
):
    """A table (pandas DataFrame) with ``case_id`` and every case's features.

    Args:
        manifest: a :class:`Manifest` or the path of its CSV.
        modalities: the image columns to use (``CT``, ``PET``, ``MR_T1``...).
        mask_column: the column holding each case's ROI mask.
        settings, device, progress, cancel: as for :func:`extract_features`.
        on_error: a case that cannot be read or measured (a missing file, an empty mask...)
            stops the run ("stop", the default) or is left out with a warning ("skip"; the
            table's ``attrs["failed"]`` maps each such case to its error). Either way the
            message names the case. Settings errors always stop the run.
        label: with multi-label masks, measure the voxels of this label value.
        units: an image whose values do not fit its column's modality (a CT not in HU, a
            PET below 0: columns swapped?) is warned about ("warn") or is the case's error
            ("error", for a classifier, whose features would be on another scale).

    Raises:
        MMAError: the first failing case's error, prefixed with its id (``on_error="stop"``,
            or when every case failed).
    """
    import pandas as pd

    if on_error not in ("stop", "skip"):
        raise ConfigError(f"on_error must be 'stop' or 'skip', not {on_error!r}.")
    if units not in ("warn", "error"):
        raise ConfigError(f"units must be 'warn' or 'error', not {units!r}.")

    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    settings = load_settings(settings)
    report = as_progress(progress)
    rows = []
    mask_column = manifest.column(mask_column)
    columns = {canonical_modality(m): manifest.modality_column(m) for m in modalities}
    failed: dict[str, MMAError] = {}
    if on_error == "stop":
        _require_files(manifest, [*columns.values(), mask_column])
    cases = _read_ahead(manifest, columns, mask_column, units)
    try:
        for number, (case_id, images, mask, problem) in enumerate(cases):
            check_cancel(cancel, "cohort feature extraction")
            part = report.sub(number / len(manifest), (number + 1) / len(manifest))
            try:
                if problem is not None:
                    raise problem
                if label is not None:
                    mask = select_label(mask, label, mask_column)
                with warnings_name_the_case(case_id):
                    values = extract_features(images, mask, settings, device, progress=part,
                                              cancel=cancel)
            except ConfigError:
                raise
            except MMAError as error:
                error = for_case(error, case_id)
                if on_error == "stop":
                    raise error from None
                failed[case_id] = error
                log.warning("left out: %s", error)
                continue
            rows.append({"case_id": case_id, **values})
            report((number + 1) / len(manifest), f"case {case_id} done")
    finally:
        cases.close()
    if failed and not rows:
        raise next(iter(failed.values()))
    table = pd.DataFrame(rows)
    table.attrs["failed"] = {case_id: str(error) for case_id, error in failed.items()}
    return table


def _require_files(manifest: Manifest, columns: Sequence[str]) -> None:
    """Refuse, before any case is measured, a manifest naming files that are not there: a
    run that stops at its 80th case loses the 79 before it."""
    missing = []
    for case_id in manifest.case_ids:
        row = manifest.row(case_id)
        for column in columns:
            try:
                path = _path(manifest, row, column, case_id)
            except MMAError:
                missing.append(f"case {case_id}: no path in column '{column}'")
                continue
            if not path.exists():
                missing.append(f"case {case_id}: {column} {path}")
    if missing:
        raise MissingModalityError(
            f"{len(missing)} file(s) the manifest {manifest.path} names are missing ("
            + "; ".join(missing[:5]) + ("; ..." if len(missing) > 5 else "")
            + "). Nothing was measured: fix the paths, or leave those cases out "
            "(--skip-failed, on_error='skip')."
        )


@contextlib.contextmanager
def warnings_name_the_case(case_id: str):
    """Prefix ``case <id>: `` to this library's warnings logged by this thread meanwhile
    (the extraction's messages name the image, "PET's grid", not which case of the cohort;
    the read-ahead thread, busy with the next case, is left alone)."""
    previous = logging.getLogRecordFactory()
    thread = threading.get_ident()

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        if (record.levelno >= logging.WARNING and record.thread == thread
                and record.name.startswith("MultiModalAnalysisLib")
                and not str(record.msg).startswith("case ")):
            prefix = f"case {case_id}: "
            record.msg = (prefix.replace("%", "%%") if record.args else prefix) + str(record.msg)
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)


READ_AHEAD = 2
"""Cases read in the background while the current one is extracted (SimpleITK releases the
interpreter lock while it reads, so decompressing the next NIfTI files overlaps with the
extraction; the bound keeps at most this many cases' images in memory besides the
current one)."""


def _read_ahead(
    manifest: Manifest, columns: dict[str, str], mask_column: str, units: str = "warn"
) -> Iterator[tuple[str, dict | None, object, MMAError | None]]:
    """(case_id, images, mask, problem) in manifest order, the next cases read in a
    background thread. A case that could not be read (a missing file, an unreadable image)
    comes with ``problem`` set to its error, in its turn, and no images."""

    def read(case_id: str):
        try:
            return _read(case_id)
        except MMAError as error:  # handed over in order, as the case's problem
            return case_id, None, None, error

    def _read(case_id: str):
        row = manifest.row(case_id)
        # read directly: extract_features checks the mask itself, more cheaply than a
        # general label-image reader would (it only looks at the voxels that are set).
        # Messages are named by column; for_case puts the case in front.
        images = {
            name: read_image(_path(manifest, row, column, case_id), name=name)
            for name, column in columns.items()
        }
        for name, image in images.items():
            # (a constant region is measurable; a constant image file is a wrong file)
            require_non_constant(image, name)
        try:  # (columns swapped?)
            require_plausible_units(images, "the manifest")
        except UnitsError as doubt:
            if units == "error":
                raise
            log.warning("case %s: %s", case_id, doubt)
        mask = read_image(_path(manifest, row, mask_column, case_id), name=mask_column)
        return case_id, images, mask, None

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
