"""The inputs of a segmentation: named, co-registered images brought onto one grid as a
multichannel array, and an optional region mask on that grid."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError, GeometryError, MissingModalityError
from MultiModalAnalysisLib.images import same_grid, validate_image
from MultiModalAnalysisLib.modalities import canonical_modality
from MultiModalAnalysisLib.preprocess import mask_on_grid, resample_to_reference

log = logging.getLogger(__name__)


@dataclass
class ImageStack:
    """Co-registered images on one grid.

    Attributes:
        names: the channel names, in order.
        reference: the grid every channel is on (the first image's grid by default).
        channels: float32 array ``[channel, z, y, x]``.
        covered: boolean ``[z, y, x]``: the voxels inside every image's field of view
            (an image on another grid that does not cover the whole reference grid is
            padded with its minimum there, which is no measurement); ``None`` when every
            image covers the whole grid.
        uncovered_by: the images that leave part of the grid uncovered.
    """

    names: list[str]
    reference: sitk.Image
    channels: np.ndarray
    covered: np.ndarray | None = None
    uncovered_by: list[str] = field(default_factory=list)

    def index(self, name: str) -> int:
        """The channel number of ``name`` (any modality spelling)."""
        return self.names.index(find_channel(self.names, name))


def find_channel(names: Sequence[str], name: str) -> str:
    """The one of ``names`` that is ``name``, or the same modality in another spelling.

    Raises:
        MissingModalityError: none is.
    """
    if name in names:
        return name
    wanted = canonical_modality(name)
    for channel in names:
        if canonical_modality(channel) == wanted:
            return channel
    raise MissingModalityError(
        f"there is no image named {name} among the inputs ({', '.join(map(str, names))})."
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
    covered, uncovered_by = coverage(images, grid)
    return ImageStack(names, grid, np.stack(channels), covered, uncovered_by)


def coverage(
    images: Mapping[str, sitk.Image], reference: sitk.Image
) -> tuple[np.ndarray | None, list[str]]:
    """Where every image has data on ``reference``'s grid (boolean ``[z, y, x]``; ``None``
    when all of them cover it all), and the names of those that do not."""
    covered = None
    uncovered_by = []
    for name, image in images.items():
        if same_grid(image, reference):
            continue
        inside = field_of_view(image, reference)
        if not inside.all():
            covered = inside if covered is None else covered & inside
            uncovered_by.append(str(name))
    return covered, uncovered_by


def field_of_view(
    image: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None
) -> np.ndarray:
    """Boolean ``[z, y, x]`` on ``reference``'s grid: where ``image`` has data, seen
    through ``transform`` (reference point -> image point; identity by default).

    Nearest neighbour with the same inside rule as the linear resampling of the stack
    (within half a voxel of the image's outer voxel centres)."""
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    inside = sitk.Resample(
        ones, reference, transform or sitk.Transform(3, sitk.sitkIdentity),
        sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8,
    )
    return sitk.GetArrayFromImage(inside) != 0


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


def within_field_of_view(
    mask: sitk.Image | None, field_of_view: sitk.Image | None, reference: sitk.Image,
) -> sitk.Image | None:
    """``mask`` (``None``: the whole of ``reference``'s grid) less the voxels outside
    ``field_of_view``: where images resampled before segmentation (registered volumes) have
    data; outside it they hold padding, which is no measurement.

    Returns ``mask`` itself when the field of view covers all of it, else a UInt8 mask on
    ``reference``'s grid, with a warning saying how much was left out.

    Raises:
        GeometryError: no voxel of the region lies inside the field of view.
    """
    if field_of_view is None:
        return mask
    if not same_grid(field_of_view, reference):
        field_of_view = resample_to_reference(field_of_view, reference, is_label=True,
                                              name="field of view")
    wanted = region_array(mask, reference)
    kept = covered_region(wanted, sitk.GetArrayFromImage(field_of_view) != 0,
                          ["a registered volume"],
                          "the mask" if mask is not None else "the reference grid")
    if np.array_equal(kept, wanted):
        return mask
    result = sitk.GetImageFromArray(kept.astype(np.uint8))
    result.CopyInformation(reference)
    return result


def stack_region(
    stack: ImageStack, mask: sitk.Image | None, *, warn: bool = True, grid: str | None = None
) -> np.ndarray:
    """The voxels to classify: the mask's region (the whole grid without one) less the
    voxels outside any image's field of view.

    Args:
        stack: the images on one grid.
        mask: the user's region, or ``None``.
        warn: log a warning when the fields of view leave part of the region out.
        grid: the name of the image whose grid the stack is on, for messages (default: the
            first channel's).

    Raises:
        GeometryError: no voxel of the region is inside every image.
    """
    region = region_array(mask, stack.reference)
    where = "the mask" if mask is not None else f"{grid or stack.names[0]}'s grid"
    return covered_region(region, stack.covered, stack.uncovered_by, where, warn=warn)


def covered_region(
    region: np.ndarray, covered: np.ndarray | None, uncovered_by: Sequence[str], where: str,
    *, warn: bool = True,
) -> np.ndarray:
    """``region`` (boolean ``[z, y, x]``) less the voxels outside ``covered`` (see
    :func:`coverage`), saying how much that leaves out; ``where`` names the region.

    Raises:
        GeometryError: no voxel of the region is covered.
    """
    if covered is None:
        return region
    kept = region & covered
    lost = int(region.sum() - kept.sum())
    if not kept.any():
        raise GeometryError(
            f"no voxel of {where} lies inside the field of view of every image (none of it "
            f"is covered by {', '.join(uncovered_by)}): give images that overlap (registered "
            "into one frame), or check the registration."
        )
    if lost and warn:
        log.warning(
            "%.1f %% of %s (%d voxels) lies outside the field of view of %s: those voxels are "
            "left unlabelled (0).", 100.0 * lost / max(int(region.sum()), 1), where, lost,
            ", ".join(uncovered_by),
        )
    return kept
