"""Foreground detection and cropping to a region of interest with a margin in mm."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError, EmptyImageError, GeometryError
from MultiModalAnalysisLib.images import (
    physical_corners,
    require_3d,
    validate_image,
    validate_mask,
)


def foreground_mask(image: sitk.Image, threshold: float | None = None) -> sitk.Image:
    """The body (foreground) of an image as a UInt8 0/1 mask.

    Thresholds at ``threshold`` (Otsu's when ``None``), keeps the largest connected component
    and fills its holes in 3-D and in each slice, so dark structures inside the body (air
    ways, bowel, a necrotic core) stay in the mask even where they reach the volume's ends.
    """
    if threshold is None:
        otsu = sitk.OtsuThresholdImageFilter()
        otsu.SetInsideValue(0)
        otsu.SetOutsideValue(1)
        mask = otsu.Execute(image)
    else:
        mask = sitk.Cast(sitk.Greater(image, float(threshold)), sitk.sitkUInt8)
    components = sitk.ConnectedComponent(mask)
    relabelled = sitk.RelabelComponent(components, sortByObjectSize=True)
    largest = sitk.Cast(sitk.Equal(relabelled, 1), sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(largest).any():
        return sitk.Cast(mask, sitk.sitkUInt8)
    filled = sitk.BinaryFillhole(largest, fullyConnected=False)
    return sitk.Cast(_fill_holes_per_slice(filled), sitk.sitkUInt8)


BODY_FRACTION = 0.1  # of the 99.5th percentile: above air and noise, below muscle on T1


def body_mask(image: sitk.Image) -> sitk.Image:
    """The body in an MR (UInt8 0/1): tissue above the noise floor, i.e. above
    ``BODY_FRACTION`` of the image's 99.5th percentile, as one component with its holes
    (bone, air ways) filled (see :func:`foreground_mask`).

    Otsu's threshold, which :func:`foreground_mask` uses by default, splits an MR's tissue
    classes rather than tissue from air when the crop holds more than one: on the 20 STS
    T1 crops it kept the bright fat and left out muscle and most tumours (Dice with the
    CT's body, HU > -400: median 0.61, as low as 0.29). This threshold gave a median of
    0.95 (0.65 to 0.99; 0.05 and 0.15 of the percentile gave the same).
    """
    high = float(np.percentile(sitk.GetArrayViewFromImage(image), 99.5))
    return foreground_mask(image, threshold=BODY_FRACTION * high)


def _fill_holes_per_slice(mask: sitk.Image) -> sitk.Image:
    array = sitk.GetArrayFromImage(mask)
    for k in range(array.shape[0]):
        if array[k].any():
            plane = sitk.GetImageFromArray(array[k])
            array[k] = sitk.GetArrayFromImage(sitk.BinaryFillhole(plane, fullyConnected=False))
    filled = sitk.GetImageFromArray(array)
    filled.CopyInformation(mask)
    return filled


def mask_index_bounds(mask: sitk.Image, image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box of ``mask``'s non-zero voxels in ``image``'s continuous index space.

    The mask may be on another grid than the image: the box is mapped through physical
    space, so a crop from a mask on a coarser or rotated grid is still right.
    """
    require_3d(mask, "the mask")
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8))
    if not stats.HasLabel(1):
        raise EmptyImageError("the mask is empty: there is no region to crop to.")
    x, y, z, sx, sy, sz = stats.GetBoundingBox(1)
    box = sitk.RegionOfInterest(mask, [sx, sy, sz], [x, y, z])
    points = physical_corners(box)
    indices = np.array([image.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points])
    return indices.min(axis=0), indices.max(axis=0)


def crop_to_mask(
    image: sitk.Image, mask: sitk.Image, margin_mm: float = 10.0, *, name: str = "image"
) -> sitk.Image:
    """Crop ``image`` to the bounding box of ``mask`` plus ``margin_mm`` on every side.

    The result is a sub-volume of the image (same spacing and direction; origin moved), so
    every voxel keeps its physical position and value. The box is clipped at the image
    border.

    Raises:
        GeometryError: the mask lies outside the image.
    """
    if margin_mm < 0:
        raise ConfigError(f"margin_mm must be >= 0, got {margin_mm}.")
    validate_image(image, name)
    lo, hi = mask_index_bounds(mask, image)
    margin = margin_mm / np.array(image.GetSpacing(), dtype=float)
    size = np.array(image.GetSize())
    # A small tolerance so that a margin of exactly k voxels does not become k + 1 through
    # floating-point error in the physical-to-index mapping.
    tolerance = 1e-6
    start = np.maximum(np.floor(lo + 0.5 - margin + tolerance), 0).astype(int)
    stop = np.minimum(np.ceil(hi - 0.5 + margin - tolerance) + 1, size).astype(int)
    if np.any(stop <= start):
        raise GeometryError(
            f"the mask lies outside {name}: nothing to crop. Check that the mask belongs to "
            "this image."
        )
    return sitk.RegionOfInterest(image, (stop - start).tolist(), start.tolist())


def crop_to_foreground(
    image: sitk.Image, margin_mm: float = 10.0, threshold: float | None = None
) -> sitk.Image:
    """Crop ``image`` to its foreground (see :func:`foreground_mask`) plus a margin in mm."""
    return crop_to_mask(image, foreground_mask(image, threshold), margin_mm)


def apply_mask(image: sitk.Image, mask: sitk.Image, outside_value: float = 0.0) -> sitk.Image:
    """A copy of ``image`` with voxels outside ``mask`` set to ``outside_value``."""
    mask = validate_mask(mask, "mask", reference=image)
    return sitk.Mask(image, mask, outsideValue=outside_value)
