"""The inputs of a segmentation: named, co-registered images brought onto one grid as a
multichannel array, and an optional region mask on that grid."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError, MissingModalityError
from MultiModalAnalysisLib.images import same_grid, validate_image
from MultiModalAnalysisLib.modalities import canonical_modality
from MultiModalAnalysisLib.preprocess import mask_on_grid, resample_to_reference


@dataclass
class ImageStack:
    """Co-registered images on one grid.

    Attributes:
        names: the channel names, in order.
        reference: the grid every channel is on (the first image's grid by default).
        channels: float32 array ``[channel, z, y, x]``.
    """

    names: list[str]
    reference: sitk.Image
    channels: np.ndarray

    def index(self, name: str) -> int:
        """The channel number of ``name`` (any modality spelling)."""
        wanted = canonical_modality(name)
        for i, channel in enumerate(self.names):
            if channel == name or canonical_modality(channel) == wanted:
                return i
        raise MissingModalityError(
            f"there is no image named {name} among the inputs ({', '.join(self.names)})."
        )


def require_images(images: Mapping[str, sitk.Image]) -> None:
    """Refuse an empty or malformed ``images`` mapping with a clear message."""
    if not isinstance(images, Mapping):
        raise ConfigError(
            "images must be a mapping of modality name -> SimpleITK.Image, e.g. "
            "{'CT': ct, 'PET': pet}; got " + type(images).__name__ + "."
        )
    if not images:
        raise MissingModalityError("no image was given to segment: pass at least one image.")


def stack_images(
    images: Mapping[str, sitk.Image], reference: sitk.Image | None = None
) -> ImageStack:
    """Validate the images and resample each (linear) onto the reference grid.

    Args:
        images: modality name -> co-registered image (same physical frame).
        reference: the grid to use; the first image's grid by default.

    Raises:
        MissingModalityError: no image; ImageDimensionError, NonFiniteImageError: a bad image;
        GeometryError: an image does not overlap the reference.
    """
    require_images(images)
    names = [str(name) for name in images]
    first = validate_image(images[names[0]], names[0])
    grid = reference if reference is not None else first
    channels = []
    for name in names:
        image = validate_image(images[name], name)
        if not same_grid(image, grid):
            image = resample_to_reference(image, grid, name=name)
        channels.append(sitk.GetArrayFromImage(image).astype(np.float32, copy=False))
    return ImageStack(names, grid, np.stack(channels))


def region_array(mask: sitk.Image | None, reference: sitk.Image, name: str = "mask") -> np.ndarray:
    """The region to segment as a boolean ``[z, y, x]`` array on ``reference``'s grid.

    Without a mask the whole grid is the region. A mask on another grid is resampled onto
    the reference (nearest neighbour).

    Raises:
        LabelError, EmptyImageError: the mask is not a usable binary mask.
    """
    if mask is None:
        return np.ones(reference.GetSize()[::-1], dtype=bool)
    return sitk.GetArrayFromImage(mask_on_grid(mask, reference, name)) != 0
