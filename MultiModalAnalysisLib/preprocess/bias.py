"""N4 bias-field correction (Tustison et al. 2010), mask-aware and fast through shrinking.

The field is estimated on a shrunk copy (so a 256^3 MR takes seconds) and then evaluated
at full resolution, where the image is divided by it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError, ImageDimensionError
from MultiModalAnalysisLib.filters import execute_filter
from MultiModalAnalysisLib.images import as_float32, validate_image, validate_mask
from MultiModalAnalysisLib.preprocess.crop import body_mask
from MultiModalAnalysisLib.progress import ProgressCallback, as_progress, check_cancel


def estimate_bias_field(
    image: sitk.Image,
    mask: sitk.Image | None = None,
    *,
    shrink_factor: int = 4,
    iterations: Sequence[int] = (50, 50, 30),
    control_points: int = 4,
    convergence: float = 1e-4,
    name: str = "image",
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> sitk.Image:
    """Estimate the multiplicative bias field of ``image`` with N4.

    Args:
        image: a 3-D intensity image (MR, typically); only its positive voxels are used.
        mask: where to estimate the field (default: the body, ``crop.body_mask``).
        shrink_factor: the field is estimated on a grid about ``shrink_factor`` times the
            median voxel spacing along every axis (coarse axes shrink less, so the shrunk grid
            is roughly isotropic); 1 disables shrinking.
        iterations: maximum iterations per fitting level (one entry per level).
        control_points: B-spline control points per axis at the coarsest level (>= 4).
        convergence: N4's convergence threshold.
        name: how to call the image in messages.
        progress: ``progress(fraction, message)`` callback.
        cancel: stops the estimation when set (raises ``OperationCancelled``).

    Returns:
        The bias field (float32, on ``image``'s grid, mean about 1 inside the mask).
    """
    if shrink_factor < 1:
        raise ConfigError(f"shrink_factor must be >= 1, got {shrink_factor}.")
    if control_points < 4:
        raise ConfigError(f"control_points must be >= 4 (spline order 3), got {control_points}.")
    image = as_float32(validate_image(image, name, require_contrast=True))
    if min(image.GetSize()) < 2:  # ITK fails on it with "Zero-valued spacing"
        raise ImageDimensionError(
            f"{name} is a single slice (size {' x '.join(map(str, image.GetSize()))}): N4 "
            "bias-field correction fits a 3-D field and needs at least 2 voxels along every "
            "axis. Correct the whole volume the slice comes from.")
    mask = (
        body_mask(image)
        if mask is None
        else validate_mask(mask, f"mask of {name}", reference=image)
    )
    # N4 works on log intensities: only strictly positive voxels can inform the fit.
    mask = sitk.And(mask, sitk.Cast(sitk.Greater(image, 0), sitk.sitkUInt8))

    factors = _shrink_factors(image, shrink_factor)
    small = sitk.Shrink(image, factors)
    small_mask = sitk.Shrink(mask, factors)
    report = as_progress(progress)
    check_cancel(cancel, f"N4 bias-field correction of {name}")

    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    corrector.SetNumberOfControlPoints([control_points] * 3)
    corrector.SetConvergenceThreshold(convergence)
    total = float(sum(iterations))
    done_before = np.concatenate([[0], np.cumsum(iterations)])

    def fraction() -> float:
        level = min(corrector.GetCurrentLevel(), len(iterations) - 1)
        return 0.95 * (done_before[level] + corrector.GetElapsedIterations()) / total

    execute_filter(
        corrector,
        small,
        small_mask,
        what=f"N4 bias-field correction of {name}",
        progress=report,
        cancel=cancel,
        event=sitk.sitkIterationEvent,
        fraction=fraction,
    )
    log_field = corrector.GetLogBiasFieldAsImage(image)
    return sitk.Cast(sitk.Exp(log_field), sitk.sitkFloat32)


def n4_bias_correction(
    image: sitk.Image,
    mask: sitk.Image | None = None,
    *,
    shrink_factor: int = 4,
    iterations: Sequence[int] = (50, 50, 30),
    control_points: int = 4,
    name: str = "image",
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> sitk.Image:
    """Return ``image`` divided by its N4 bias field (float32, same grid).

    See :func:`estimate_bias_field` for the arguments.
    """
    field = estimate_bias_field(
        image,
        mask,
        shrink_factor=shrink_factor,
        iterations=iterations,
        control_points=control_points,
        name=name,
        progress=progress,
        cancel=cancel,
    )
    return sitk.Divide(as_float32(image), field)


def _shrink_factors(image: sitk.Image, shrink_factor: int) -> list[int]:
    spacing = np.array(image.GetSpacing(), dtype=float)
    size = np.array(image.GetSize())
    factors = np.maximum(np.round(shrink_factor * np.median(spacing) / spacing), 1)
    # Keep at least 8 voxels along each axis for the spline fit.
    factors = np.minimum(factors, np.maximum(size // 8, 1))
    return [int(f) for f in factors]
