"""Modality presets: the standard preprocessing of each modality, chosen by its name.

- CT: clip to [-1024, 3071] HU (air to dense bone; removes padding values such as -3024).
- PET: SUV kept as is (only converted to float32); negative values from reconstruction are
  kept, because they carry noise statistics that later steps may want.
- MR (T1, T2, FLAIR, ...): N4 bias-field correction, then z-score inside the body (tissue
  above the noise floor, ``crop.body_mask``), because MR intensities have no absolute unit.
- anything else: converted to float32 only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import SimpleITK as sitk

from MultiModalAnalysisLib.images import as_float32, validate_image
from MultiModalAnalysisLib.modalities import modality_family
from MultiModalAnalysisLib.preprocess.bias import n4_bias_correction
from MultiModalAnalysisLib.preprocess.crop import body_mask
from MultiModalAnalysisLib.preprocess.normalise import clip_intensity, zscore
from MultiModalAnalysisLib.progress import ProgressCallback, as_progress, check_cancel


@dataclass(frozen=True)
class ModalityPreset:
    """What the preset of one modality family does."""

    family: str
    clip_range: tuple[float, float] | None = None
    bias_correction: bool = False
    zscore_in_foreground: bool = False

    def describe(self) -> str:
        steps = []
        if self.clip_range is not None:
            steps.append(f"clip to [{self.clip_range[0]:g}, {self.clip_range[1]:g}]")
        if self.bias_correction:
            steps.append("N4 bias-field correction")
        if self.zscore_in_foreground:
            steps.append("z-score in the body (tissue above 10 % of the 99.5th percentile)")
        return ", ".join(steps) or "kept as is (float32)"


PRESETS: dict[str, ModalityPreset] = {
    "CT": ModalityPreset("CT", clip_range=(-1024.0, 3071.0)),
    "PET": ModalityPreset("PET"),
    "MR": ModalityPreset("MR", bias_correction=True, zscore_in_foreground=True),
    "OTHER": ModalityPreset("OTHER"),
}


def preset_for(modality: str) -> ModalityPreset:
    """The preset applied to images of ``modality`` (by family; ``OTHER`` if unknown)."""
    return PRESETS.get(modality_family(modality), PRESETS["OTHER"])


def apply_modality_preset(
    image: sitk.Image,
    modality: str,
    *,
    mask: sitk.Image | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> sitk.Image:
    """Apply the standard preprocessing of ``modality`` to ``image``; returns a new image.

    Args:
        image: the volume (never modified).
        modality: its modality name (``CT``, ``PET``, ``MR_T1``, ``FLAIR``, ...).
        mask: for MR, the region used for N4 and the z-score (default: the body, see
            ``crop.body_mask``).
        progress: ``progress(fraction, message)`` callback.
        cancel: stops the work when set.
    """
    preset = preset_for(modality)
    report = as_progress(progress)
    image = as_float32(validate_image(image, modality, require_contrast=preset.family == "MR"))
    check_cancel(cancel, f"preprocessing of {modality}")
    if preset.clip_range is not None:
        image = clip_intensity(image, *preset.clip_range)
    if preset.bias_correction or preset.zscore_in_foreground:
        region = mask if mask is not None else body_mask(image)
        if preset.bias_correction:
            image = n4_bias_correction(
                image, region, name=modality, progress=report.sub(0.0, 0.9), cancel=cancel
            )
        if preset.zscore_in_foreground:
            image = zscore(image, region, name=modality)
    report(1.0, f"{modality}: {preset.describe()}")
    return image
