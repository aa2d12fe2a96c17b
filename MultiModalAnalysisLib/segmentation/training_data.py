"""Training cases for a segmentation network: each manifest row's images prepared as the
network will see them (see ``model_inputs``) and its label map on the same grid, optionally
cached on disk so that repeated trainings (cross-validation) prepare each case once."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.case import Manifest, read_manifest
from MultiModalAnalysisLib.errors import LabelError, ManifestError
from MultiModalAnalysisLib.images import image_from_array
from MultiModalAnalysisLib.io import read_image
from MultiModalAnalysisLib.modalities import canonical_modality
from MultiModalAnalysisLib.progress import ProgressCallback, as_progress, check_cancel
from MultiModalAnalysisLib.segmentation.model_inputs import onto_grid, prepare_channels

# 3: the key holds the modality presets and the project's version (an MR preset changed
# under version 2 kept serving cases prepared with the old one)
CACHE_VERSION = 3


@dataclass
class TrainingCase:
    """One case as the network trains on it: ``image [channel, z, y, x]`` (float32) and
    ``label [z, y, x]`` (uint8, 0 = background) on the model grid ``grid``."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    grid: sitk.Image


def as_manifest(manifest: str | Path | Manifest) -> Manifest:
    """A :class:`Manifest` from a path or an already-read manifest."""
    return manifest if isinstance(manifest, Manifest) else read_manifest(manifest)


def median_spacing(manifest: Manifest, modality: str, cases: Sequence[str]) -> list[float]:
    """Median voxel spacing (x, y, z) of ``modality`` over ``cases`` (headers only)."""
    column = manifest.modality_column(modality)
    spacings = []
    for case_id in cases:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(manifest.resolve(manifest.row(case_id)[column])))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            continue  # an unreadable file is reported when the case is loaded
        spacings.append(reader.GetSpacing())
    if not spacings:
        raise ManifestError(f"no readable {modality} image in {manifest.path}.")
    return np.median(np.array(spacings), axis=0).tolist()


def label_values(manifest: Manifest, label_column: str, cases: Sequence[str]) -> list[int]:
    """The non-zero label values used over ``cases`` (sorted)."""
    values: set[int] = set()
    for case_id in cases:
        path = manifest.resolve(manifest.row(case_id)[manifest.column(label_column)])
        array = sitk.GetArrayFromImage(read_image(path, name=f"{label_column} of {case_id}"))
        found = np.unique(array)
        if np.any(found < 0) or np.any(np.mod(found, 1) != 0):
            raise LabelError(
                f"{label_column} of case {case_id} ({path}) is not a label map (negative or "
                "non-integer values): give masks or label images."
            )
        values.update(int(v) for v in found if v != 0)
    if not values:
        raise LabelError(f"every {label_column} mask of the training cases is empty.")
    return sorted(values)


def label_on_grid(mask: sitk.Image, grid: sitk.Image, values: Sequence[int]) -> np.ndarray:
    """Labels ``values`` of ``mask`` as 1..len(values) on ``grid``.

    Each label is resampled as a smoothed fraction (anti-aliased, linear) and every voxel
    takes the label covering most of it, so a coarser grid keeps the volume of thin
    structures better than nearest-neighbour would.
    """
    source = sitk.GetArrayViewFromImage(mask)
    fractions = [np.full(grid.GetSize()[::-1], 0.5, np.float32)]  # background wins ties
    for value in values:
        one = image_from_array((source == value).astype(np.float32), mask)
        fractions.append(sitk.GetArrayFromImage(onto_grid(one, grid, name="label")))
    return np.argmax(np.stack(fractions), axis=0).astype(np.uint8)


def _cache_key(manifest: Manifest, case_id: str, columns: Sequence[str], settings: dict) -> str:
    row = manifest.row(case_id)
    files = []
    for column in columns:
        path = manifest.resolve(row[column])
        stat = path.stat() if path.exists() else None
        files.append([str(path), stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0])
    text = json.dumps([CACHE_VERSION, files, settings], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def load_training_case(
    manifest: Manifest,
    case_id: str,
    modalities: Sequence[str],
    label_column: str,
    spacing: Sequence[float],
    normalisations: dict[str, dict[str, Any]],
    values: Sequence[int],
    *,
    cache_dir: str | Path | None = None,
    cancel: threading.Event | None = None,
) -> TrainingCase:
    """Prepare one manifest row (or read it from ``cache_dir`` when prepared before)."""
    names = [canonical_modality(m) for m in modalities]
    columns = [manifest.modality_column(m) for m in names] + [manifest.column(label_column)]
    from MultiModalAnalysisLib import __version__
    from MultiModalAnalysisLib.preprocess import preset_for

    # (everything that decides the prepared arrays: a changed preset prepares anew)
    settings = {"modalities": names, "spacing": list(spacing), "normalisation": normalisations,
                "values": list(values), "presets": {m: preset_for(m).describe() for m in names},
                "version": __version__}
    cached = None
    if cache_dir is not None:
        key = _cache_key(manifest, case_id, columns, settings)
        cached = Path(cache_dir) / f"{case_id}-{key}.npz"
        if cached.is_file():
            with np.load(cached) as stored:
                grid = model_grid_from(stored)
                return TrainingCase(case_id, stored["image"], stored["label"], grid)
    case = manifest.load_case(case_id, names, [label_column])
    image, grid = prepare_channels(case.images, names, spacing, normalisations, cancel=cancel)
    label = label_on_grid(case.mask(label_column), grid, values)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cached, image=image, label=label, size=grid.GetSize(), spacing=grid.GetSpacing(),
                 origin=grid.GetOrigin(), direction=grid.GetDirection())
    return TrainingCase(case_id, image, label, grid)


def model_grid_from(stored) -> sitk.Image:
    """The grid saved next to a cached case."""
    grid = sitk.Image([int(s) for s in stored["size"]], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in stored["spacing"]])
    grid.SetOrigin([float(s) for s in stored["origin"]])
    grid.SetDirection([float(s) for s in stored["direction"]])
    return grid


def load_training_cases(
    manifest: Manifest,
    case_ids: Sequence[str],
    modalities: Sequence[str],
    label_column: str,
    spacing: Sequence[float],
    normalisations: dict[str, dict[str, Any]],
    values: Sequence[int],
    *,
    cache_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> list[TrainingCase]:
    """Prepare every case of ``case_ids`` (see :func:`load_training_case`)."""
    report = as_progress(progress)
    cases = []
    for i, case_id in enumerate(case_ids):
        check_cancel(cancel, "preparing the training cases")
        cases.append(load_training_case(
            manifest, case_id, modalities, label_column, spacing, normalisations, values,
            cache_dir=cache_dir, cancel=cancel,
        ))
        report((i + 1) / len(case_ids), f"prepared {case_id}")
    return cases
