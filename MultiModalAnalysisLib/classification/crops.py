"""Multichannel ROI crops: every modality of a case resampled onto one small cubic grid
around the lesion, the input of the deep classifier."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError
from MultiModalAnalysisLib.images import require_plausible_units, validate_mask
from MultiModalAnalysisLib.preprocess import crop_to_mask, resample_to_reference


@dataclass
class CropSettings:
    """How ROI crops are cut.

    Attributes:
        size: voxels along each side of the cubic crop.
        margin_mm: context kept around the mask's bounding box.
        include_mask: add the mask as a last channel (so the network knows the lesion).
    """

    size: int = 32
    margin_mm: float = 10.0
    include_mask: bool = True

    def __post_init__(self) -> None:
        if self.size < 16:
            # The networks halve the resolution four times before their global pooling.
            raise ConfigError(f"crop size must be at least 16 voxels, got {self.size}.")
        if self.margin_mm < 0:
            raise ConfigError(f"crop margin must be >= 0 mm, got {self.margin_mm}.")

    def to_dict(self) -> dict:
        return asdict(self)


def crop_grid(reference: sitk.Image, mask: sitk.Image, settings: CropSettings) -> sitk.Image:
    """A cubic grid of ``settings.size`` voxels over the mask's box plus margin.

    The box comes from :func:`preprocess.crop_to_mask` on the reference image; the grid
    keeps the reference's orientation and has isotropic spacing, chosen so the longest
    side of the box fits (the lesion keeps its shape; its size is normalised).
    """
    box = crop_to_mask(reference, mask, settings.margin_mm, name="the reference image")
    size = np.array(box.GetSize(), dtype=float)
    spacing = np.array(box.GetSpacing(), dtype=float)
    direction = np.array(box.GetDirection(), dtype=float).reshape(3, 3)
    centre = np.array(box.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    step = float((size * spacing).max()) / settings.size
    half = step * (settings.size - 1) / 2.0
    grid = sitk.Image([settings.size] * 3, sitk.sitkUInt8)
    grid.SetSpacing([step] * 3)
    grid.SetDirection(box.GetDirection())
    grid.SetOrigin((centre - direction @ np.full(3, half)).tolist())
    return grid


def roi_crop(
    images: Mapping[str, sitk.Image], mask: sitk.Image, settings: CropSettings | None = None
) -> np.ndarray:
    """The [channel, z, y, x] float32 crop of ``images`` (in the mapping's order) around
    ``mask``; the mask is the last channel when ``settings.include_mask``.

    The images must share a physical frame (co-registered); their grids may differ: each
    one is resampled (linear; the mask nearest neighbour) onto the crop grid.

    Raises:
        EmptyImageError: the mask is empty; GeometryError: it lies outside the images.
    """
    settings = settings or CropSettings()
    if not images:
        raise ConfigError("roi_crop needs at least one image.")
    mask = validate_mask(mask, "the lesion mask")
    require_plausible_units(images, "the deep classifier")
    names = list(images)
    grid = crop_grid(images[names[0]], mask, settings)
    channels = [
        sitk.GetArrayFromImage(resample_to_reference(images[name], grid, name=name))
        for name in names
    ]
    if settings.include_mask:
        resampled = resample_to_reference(mask, grid, is_label=True, name="the lesion mask")
        channels.append(sitk.GetArrayFromImage(resampled).astype(np.float32))
    return np.stack(channels).astype(np.float32)
