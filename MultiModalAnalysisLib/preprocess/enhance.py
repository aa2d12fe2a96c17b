"""Contrast enhancement: contrast stretching, unsharp-mask sharpening and contrast-limited
adaptive histogram equalisation (CLAHE)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError
from MultiModalAnalysisLib.images import as_float32, image_from_array, validate_image
from MultiModalAnalysisLib.preprocess.normalise import rescale_percentiles

#: Contrast stretching is percentile rescaling: ``contrast_stretch(image, 2, 98)`` maps the
#: 2nd..98th percentiles onto [0, 1].
contrast_stretch = rescale_percentiles


def unsharp_mask(image: sitk.Image, sigma_mm: float = 1.0, amount: float = 1.0) -> sitk.Image:
    """Sharpen: ``image + amount * (image - gaussian(image, sigma_mm))``.

    Args:
        image: the image to sharpen.
        sigma_mm: width of the blur that defines the detail layer, in mm.
        amount: how much of the detail layer to add back (0 returns the image).

    Raises:
        NonFiniteImageError: the image holds NaN or infinite values (the blur would spread
            them over the whole volume).
    """
    if sigma_mm <= 0:
        raise ConfigError(f"sigma_mm must be > 0, got {sigma_mm}.")
    if amount < 0:
        raise ConfigError(f"amount must be >= 0, got {amount}.")
    image = as_float32(validate_image(image, "the image to sharpen"))
    blurred = sitk.SmoothingRecursiveGaussian(image, float(sigma_mm))
    return sitk.Add(image, sitk.Multiply(sitk.Subtract(image, blurred), float(amount)))


def adaptive_histogram_equalisation(
    image: sitk.Image,
    kernel_mm: float = 40.0,
    clip_limit: float = 0.01,
    *,
    low_percentile: float = 0.5,
    high_percentile: float = 99.5,
    name: str = "image",
) -> sitk.Image:
    """3-D CLAHE (scikit-image's ``equalize_adapthist``) with a kernel in mm.

    The image is first mapped to [0, 1] between two percentiles; the result is in [0, 1].

    Args:
        image: the image to equalise.
        kernel_mm: side of the contextual region in mm (converted to voxels per axis).
        clip_limit: contrast limit in (0, 1]; higher gives more contrast.
        low_percentile, high_percentile: the intensity range mapped to [0, 1] first.
        name: how to call the image in messages.
    """
    from skimage.exposure import equalize_adapthist

    if not 0 < clip_limit <= 1:
        raise ConfigError(f"clip_limit must be in (0, 1], got {clip_limit}.")
    if kernel_mm <= 0:
        raise ConfigError(f"kernel_mm must be > 0, got {kernel_mm}.")
    validate_image(image, name, require_contrast=True)
    unit = rescale_percentiles(image, low_percentile, high_percentile, name=name)
    array = sitk.GetArrayFromImage(unit)
    spacing_zyx = np.array(image.GetSpacing()[::-1], dtype=float)
    kernel = np.clip(np.round(kernel_mm / spacing_zyx), 2, np.array(array.shape)).astype(int)
    equalised = equalize_adapthist(array, kernel_size=tuple(kernel), clip_limit=clip_limit)
    return image_from_array(equalised.astype(np.float32), image)
