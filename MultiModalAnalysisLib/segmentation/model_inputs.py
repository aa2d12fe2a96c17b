"""How a network sees its inputs: each modality is resampled onto one grid at the model's
spacing, goes through its preset there (CT clip, MR N4 + z-score, ...), and has its
intensities mapped to about [-1, 1] by a fixed, per-modality range stored with the model.

The presets run on the model's (coarser) grid rather than the native one because N4 costs
grow with the voxel count: on a 241x274x97 MR it took 5-8 times longer at full resolution,
for a smooth bias field that the coarser grid captures as well.

Training and inference share these functions, so a model always sees its inputs prepared
exactly as in training.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError
from MultiModalAnalysisLib.images import as_float32, same_grid, validate_image
from MultiModalAnalysisLib.modalities import canonical_modality, modality_family
from MultiModalAnalysisLib.preprocess import (
    apply_modality_preset,
    resample_to_reference,
    resample_to_spacing,
)
from MultiModalAnalysisLib.progress import ProgressCallback, as_progress, check_cancel

# Intensity window per modality family after its preset, mapped linearly to [-1, 1]: a
# soft-tissue-and-fat CT window in HU, SUV 0-15 for PET, z-scores -3..5 for MR (after the
# preset's N4 + z-score in the body). Outside the window values are clipped.
DEFAULT_WINDOWS: dict[str, tuple[float, float]] = {
    "CT": (-250.0, 350.0),
    "PET": (0.0, 15.0),
    "MR": (-3.0, 5.0),
}


def default_normalisation(modality: str) -> dict[str, Any]:
    """How to map ``modality``'s intensities to the network's range (stored in the model)."""
    family = modality_family(modality)
    if family in DEFAULT_WINDOWS:
        low, high = DEFAULT_WINDOWS[family]
        return {"kind": "window", "low": low, "high": high}
    # Unknown units: the case's own 0.5-99.5 percentiles.
    return {"kind": "percentiles", "low": 0.5, "high": 99.5}


def normalise_channel(array: np.ndarray, normalisation: Mapping[str, Any]) -> np.ndarray:
    """Map one channel to about [-1, 1] as ``normalisation`` says (a new float32 array)."""
    kind = normalisation.get("kind")
    if kind == "window":
        low, high = float(normalisation["low"]), float(normalisation["high"])
    elif kind == "percentiles":
        low, high = np.percentile(array, [normalisation["low"], normalisation["high"]])
        high = high if high > low else low + 1.0
    else:
        raise ConfigError(f"unknown intensity normalisation {normalisation!r}.")
    scaled = (np.clip(array, low, high) - low) / (high - low)
    return (2.0 * scaled - 1.0).astype(np.float32)


def model_grid(reference: sitk.Image, spacing: Sequence[float]) -> sitk.Image:
    """A grid over ``reference``'s extent and orientation at ``spacing`` (mm, x y z)."""
    return resample_to_spacing(reference, list(spacing), interpolator="nearest", antialias=False)


def onto_grid(image: sitk.Image, grid: sitk.Image, *, name: str, is_label: bool = False):
    """``image`` resampled onto ``grid``, anti-aliased where the grid is coarser."""
    if same_grid(image, grid):
        return image if is_label else as_float32(image)
    if not is_label and np.any(np.array(grid.GetSpacing()) > np.array(image.GetSpacing()) * 1.01):
        # Down-sampling: smooth on the image's own axes first (resample_to_spacing's
        # anti-aliasing), then interpolate onto the grid.
        coarser = np.maximum(np.array(grid.GetSpacing()), np.array(image.GetSpacing()))
        image = resample_to_spacing(image, coarser.tolist())
    return resample_to_reference(image, grid, is_label=is_label, name=name)


def prepare_channels(
    images: Mapping[str, sitk.Image],
    modalities: Sequence[str],
    spacing: Sequence[float],
    normalisations: Mapping[str, Mapping[str, Any]],
    *,
    reference: sitk.Image | None = None,
    presets_applied: bool = False,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> tuple[np.ndarray, sitk.Image]:
    """The network input ``[channel, z, y, x]`` (float32) and the grid it lies on.

    Args:
        images: canonical modality name -> image (every name of ``modalities`` present).
        modalities: the channels, in the network's order.
        spacing: the model's voxel spacing (mm, x y z).
        normalisations: per modality, see :func:`normalise_channel`.
        reference: whose extent and orientation the grid takes (default: the first
            modality's image).
        presets_applied: the images already went through their modality presets.
        progress: ``progress(fraction, message)`` callback.
        cancel: stops the work when set.
    """
    report = as_progress(progress)
    names = [canonical_modality(m) for m in modalities]
    grid = model_grid(reference if reference is not None else images[names[0]], spacing)
    channels = []
    for i, name in enumerate(names):
        check_cancel(cancel, "preparing the network inputs")
        on_grid = onto_grid(validate_image(images[name], name), grid, name=name)
        if not presets_applied:
            on_grid = apply_modality_preset(on_grid, name, progress=report.sub(
                i / len(names), (i + 0.8) / len(names)), cancel=cancel)
        array = sitk.GetArrayViewFromImage(on_grid)
        channels.append(normalise_channel(array, normalisations[name]))
        report((i + 1) / len(names), f"{name} ready")
    return np.stack(channels), grid
