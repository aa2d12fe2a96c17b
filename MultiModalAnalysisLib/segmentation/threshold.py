"""Threshold segmentation: Otsu, a fixed intensity range, and the PET convention of a
fraction of SUVmax within the connected component that holds the maximum."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError, EmptyImageError
from MultiModalAnalysisLib.images import image_from_array, validate_image
from MultiModalAnalysisLib.segmentation.inputs import region_array
from MultiModalAnalysisLib.segmentation.postprocess import component_at


def otsu_threshold(
    image: sitk.Image, mask: sitk.Image | None = None, *, name: str = "image"
) -> tuple[sitk.Image, float]:
    """Voxels above Otsu's threshold (computed inside ``mask`` when given).

    Returns:
        ``(mask, threshold)``: a UInt8 0/1 image (0 outside ``mask``) and the threshold.
    """
    image = validate_image(image, name, require_contrast=True)
    region = region_array(mask, image, f"mask for {name}")
    values = sitk.GetArrayViewFromImage(image)
    from skimage.filters import threshold_otsu

    inside = np.asarray(values)[region]
    if inside.min() == inside.max():
        raise EmptyImageError(f"{name} is constant inside the mask: Otsu has nothing to split.")
    threshold = float(threshold_otsu(inside))
    result = (values > threshold) & region
    return image_from_array(result.astype(np.uint8), image), threshold


def range_threshold(
    image: sitk.Image,
    low: float | None = None,
    high: float | None = None,
    mask: sitk.Image | None = None,
    *,
    name: str = "image",
) -> sitk.Image:
    """Voxels with ``low <= value <= high`` (``None``: open on that side), inside ``mask``."""
    if low is None and high is None:
        raise ConfigError("a range threshold needs low, high or both.")
    if low is not None and high is not None and low > high:
        raise ConfigError(f"the threshold range is empty: low {low} > high {high}.")
    image = validate_image(image, name)
    values = sitk.GetArrayViewFromImage(image)
    result = region_array(mask, image, f"mask for {name}")
    if low is not None:
        result = result & (values >= low)
    if high is not None:
        result = result & (values <= high)
    return image_from_array(result.astype(np.uint8), image)


def suv_fraction_threshold(
    pet: sitk.Image,
    fraction: float = 0.4,
    mask: sitk.Image | None = None,
    *,
    name: str = "PET",
) -> tuple[sitk.Image, float]:
    """The lesion as the PET voxels above ``fraction`` x SUVmax that are connected to the
    maximum (the classic 40 %-of-SUVmax contour).

    Args:
        pet: a PET image in SUV (or any uptake unit).
        fraction: of the maximum, in (0, 1].
        mask: the volume of interest: SUVmax is taken, and the contour drawn, inside it
            (the whole image by default).
        name: how to call the image in messages.

    Returns:
        ``(mask, threshold)``: the UInt8 0/1 lesion and the threshold in the image's units.
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction of SUVmax must be in (0, 1], got {fraction}.")
    pet = validate_image(pet, name, require_contrast=True)
    values = sitk.GetArrayViewFromImage(pet)
    region = region_array(mask, pet, f"mask for {name}")
    inside = np.where(region, values, -np.inf)
    peak = np.unravel_index(int(np.argmax(inside)), inside.shape)  # z, y, x
    suv_max = float(values[peak])
    if suv_max <= 0:
        raise EmptyImageError(
            f"{name} has no positive uptake inside the region (maximum {suv_max:g}): a "
            "fraction-of-SUVmax contour is undefined."
        )
    threshold = fraction * suv_max
    above = image_from_array(((values >= threshold) & region).astype(np.uint8), pet)
    return component_at(above, peak[::-1]), threshold
