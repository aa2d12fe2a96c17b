"""Steps over a whole :class:`~MultiModalAnalysisLib.case.Case`, with a typed configuration.

Each step takes a case and returns a new one; the images of the input case are never
modified.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from MultiModalAnalysisLib.case import Case
from MultiModalAnalysisLib.modalities import canonical_modality
from MultiModalAnalysisLib.preprocess import apply_modality_preset
from MultiModalAnalysisLib.progress import ProgressCallback, as_progress, check_cancel


@dataclass(frozen=True)
class PreprocessConfig:
    """How a case is preprocessed before fusion.

    Attributes:
        presets: apply each modality's preset (CT clip, PET as is, MR N4 + z-score).
        reference_modality: the grid every modality and mask is resampled onto.
        target_spacing: when set, the reference grid is first resampled to this spacing (mm).
    """

    presets: bool = True
    reference_modality: str = "CT"
    target_spacing: tuple[float, float, float] | None = None


def preprocess_case(
    case: Case,
    *,
    modalities: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> Case:
    """Apply each modality's preset (see ``preprocess.presets``) to the case's images.

    Args:
        case: the input case (not modified).
        modalities: which images to preprocess (all by default); others are carried over.
        progress: ``progress(fraction, message)`` callback.
        cancel: stops the work when set.
    """
    report = as_progress(progress)
    names = [canonical_modality(m) for m in modalities] if modalities else case.modalities
    case.require(names)
    images = dict(case.images)
    for i, name in enumerate(names):
        check_cancel(cancel, f"preprocessing of case {case.case_id}")
        step = report.sub(i / len(names), (i + 1) / len(names))
        images[name] = apply_modality_preset(case.images[name], name, progress=step, cancel=cancel)
    return case.replace(images=images)


def resample_case_to_reference(
    case: Case,
    reference_modality: str = "CT",
    *,
    target_spacing: Sequence[float] | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> Case:
    """Resample every image (linear) and mask (nearest neighbour) onto one modality's grid.

    Assumes the images already share a physical frame (as scanner-aligned PET/CT); to
    resample through registration transforms, use ``fusion.resample_case`` (this is that
    function without transforms).

    Args:
        case: the input case (not modified).
        reference_modality: the modality whose grid the others take.
        target_spacing: resample the reference grid to this spacing (mm) first.
        progress: ``progress(fraction, message)`` callback.
        cancel: stops the work when set.
    """
    from MultiModalAnalysisLib.fusion import resample_case

    return resample_case(case, reference_modality, target_spacing=target_spacing,
                         progress=progress, cancel=cancel)
