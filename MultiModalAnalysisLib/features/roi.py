"""The region of interest after the IBSI image-processing chain, as torch tensors.

IBSI order: interpolate the image and the mask (optional), take the interpolated mask as
the *morphological* mask, then re-segment it by intensity range and outliers into the
*intensity* mask. Everything is cropped to the mask's bounding box plus a margin (enough
for the local-intensity sphere), which is where all the feature work happens.

A mask on another grid than its image is resampled onto the image's grid with a warning
(``mask_grid_mismatch="resample"``, the default) or refused (``"error"``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch

from MultiModalAnalysisLib.errors import ConfigError, EmptyImageError, GeometryError, LabelError
from MultiModalAnalysisLib.features.neighbours import flat_positions
from MultiModalAnalysisLib.features.settings import FeatureSettings
from MultiModalAnalysisLib.images import overlap_fraction, same_grid, validate_image
from MultiModalAnalysisLib.preprocess.resample import MAX_VOXELS, warn_about_voxels_outside

log = logging.getLogger(__name__)

# IBSI local intensity peak: a sphere of 1 cm^3, radius (3 / (4 pi))^(1/3) cm.
PEAK_RADIUS_MM = (3.0 / (4.0 * math.pi)) ** (1.0 / 3.0) * 10.0

_SITK_INTERPOLATORS = {
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
}


@dataclass
class RegionOfInterest:
    """An image and its two IBSI masks on a cropped grid, as ``[z, y, x]`` tensors.

    Attributes:
        image: intensities (float64).
        morphology_mask: the (interpolated) ROI: shape, volume, distance to the border.
        intensity_mask: the re-segmented ROI: every intensity and texture feature.
        spacing: voxel spacing in mm as (z, y, x).
        name: how to call the image in messages.
    """

    image: torch.Tensor
    morphology_mask: torch.Tensor
    intensity_mask: torch.Tensor
    spacing: tuple[float, float, float]
    name: str = "image"
    _values: torch.Tensor | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.image.device

    @property
    def values(self) -> torch.Tensor:
        """The intensities inside the intensity mask (1-D)."""
        if self._values is None:
            self._values = self.image[self.intensity_mask]
        return self._values

    @property
    def voxel_volume(self) -> float:
        return float(np.prod(self.spacing))

    def cropped_to_mask(self) -> RegionOfInterest:
        """The same region on the morphological mask's bounding box (no margin).

        Every family but local intensity looks only inside the masks; a tight box keeps
        their work (shifts, FFTs, labelling) small.
        """
        box = bounding_box(self.morphology_mask)
        return RegionOfInterest(
            self.image[box].contiguous(),
            self.morphology_mask[box].contiguous(),
            self.intensity_mask[box].contiguous(),
            self.spacing,
            self.name,
        )


def bounding_box(mask: torch.Tensor) -> tuple[slice, slice, slice]:
    """The smallest box holding every set voxel of a (non-empty) 3-D mask."""
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        used = flat_positions(mask.any(dim=others))
        box.append(slice(int(used[0]), int(used[-1]) + 1))
    return tuple(box)


def prepare_roi(
    image: sitk.Image,
    mask: sitk.Image,
    settings: FeatureSettings,
    device: torch.device,
    name: str = "image",
) -> RegionOfInterest:
    """Validate, match grids, interpolate, re-segment and crop ``image`` and ``mask``.

    Raises:
        EmptyImageError: the mask is empty, lies outside the image, or re-segmentation
            leaves no voxel.
        LabelError: the mask has several labels or non-integer values.
        GeometryError: mask on another grid with ``mask_grid_mismatch="error"``.
    """
    image = validate_image(image, name)
    inside = binary_mask(mask, f"mask of {name}")
    if not same_grid(mask, image):
        mask = _mask_on_image_grid(image, _as_image(inside, mask), settings, name)
        inside = sitk.GetArrayViewFromImage(mask) > 0
    if settings.new_spacing is not None:
        image, mask = _interpolate(image, _as_image(inside, image), settings)
        inside = sitk.GetArrayViewFromImage(mask) > 0
    if not inside.any():
        raise EmptyImageError(
            f"the mask of {name} selects no voxel on the image's grid (after interpolation). "
            "Check that the mask belongs to this image."
        )
    crop = _crop_box(inside, image.GetSpacing()[::-1])
    image_array = sitk.GetArrayViewFromImage(image)
    # a copy: SimpleITK's array view is read-only and torch wants writable memory
    intensities = torch.as_tensor(np.array(image_array[crop], dtype=np.float64), device=device)
    if settings.intensity_rounding:
        intensities = torch.round(intensities)
    morphology = torch.as_tensor(np.ascontiguousarray(inside[crop]), device=device)
    intensity_mask = resegment(intensities, morphology, settings, name)
    return RegionOfInterest(
        intensities, morphology, intensity_mask, tuple(image.GetSpacing()[::-1]), name
    )


def binary_mask(mask: sitk.Image, name: str = "mask") -> np.ndarray:
    """The mask's voxels that are set, as a boolean ``[z, y, x]`` array.

    Raises:
        ImageDimensionError: not a 3-D scalar image. EmptyImageError: nothing set.
        LabelError: non-integer values, or more than one non-zero label.
    """
    validate_image(mask, name)
    array = sitk.GetArrayViewFromImage(mask)
    inside = array != 0
    # the distinct labels of the set voxels only: far fewer values to sort than the image
    labels = np.unique(array[inside])
    if labels.size == 0:
        raise EmptyImageError(f"{name} is empty: no voxel is set. Draw or select a region.")
    if np.any(np.mod(labels, 1) != 0):
        raise LabelError(
            f"{name} holds non-integer values (e.g. {labels[np.mod(labels, 1) != 0][:3]}); a "
            "mask must be a label image. Was an intensity image given as the mask?"
        )
    if labels.size > 1:
        raise LabelError(
            f"{name} holds {labels.size} different labels ({labels[:6].tolist()}); a binary "
            "mask (0 outside, one value inside) is needed. Select one label first (mma "
            "features --label N; images.select_label)."
        )
    return inside


def _as_image(inside: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(inside.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def resegment(
    image: torch.Tensor, mask: torch.Tensor, settings: FeatureSettings, name: str = "image"
) -> torch.Tensor:
    """The IBSI intensity mask: ``mask`` restricted to the range and without outliers.

    Outliers are judged by the mean and standard deviation over the whole ``mask``.
    """
    keep = mask.clone()
    if settings.resegmentation_range is not None:
        low, high = settings.resegmentation_range
        if low is not None:
            keep &= image >= low
        if high is not None:
            keep &= image <= high
    if settings.resegmentation_outlier_sigma is not None:
        values = image[mask]
        mean, sd = values.mean(), values.std(unbiased=False)
        sigma = settings.resegmentation_outlier_sigma
        keep &= (image >= mean - sigma * sd) & (image <= mean + sigma * sd)
    if not keep.any():
        raise EmptyImageError(
            f"re-segmentation of {name} (range {settings.resegmentation_range}, outlier "
            f"sigma {settings.resegmentation_outlier_sigma}) leaves no voxel in the ROI. "
            "Widen the range or check the image's units."
        )
    return keep


def _mask_on_image_grid(
    image: sitk.Image, mask: sitk.Image, settings: FeatureSettings, name: str
) -> sitk.Image:
    """A binary mask on another grid, resampled onto the image's (or refused)."""
    if overlap_fraction(mask, image) <= 0.0:
        raise EmptyImageError(
            f"the mask lies outside {name}: they share no physical space. Check that the "
            "mask belongs to this image (same patient and frame of reference)."
        )
    if settings.mask_grid_mismatch == "error":
        raise GeometryError(
            f"the mask is not on {name}'s grid (size {mask.GetSize()} vs {image.GetSize()}, "
            f"spacing {mask.GetSpacing()} vs {image.GetSpacing()}). Resample it onto the "
            "image, or set mask_grid_mismatch to 'resample'."
        )
    log.warning(
        "the mask is not on %s's grid (size %s vs %s); resampling it onto the image "
        "(%s interpolation, partial-volume threshold %.2f).",
        name,
        mask.GetSize(),
        image.GetSize(),
        settings.roi_interpolation_method,
        settings.roi_partial_volume_threshold,
    )
    warn_about_voxels_outside(mask, image, "the mask", where=f"{name}'s field of view")
    return mask_onto_image(mask, image, settings)


def mask_onto_image(mask: sitk.Image, image: sitk.Image, settings: FeatureSettings,
                    image_to_mask: sitk.Transform | None = None) -> sitk.Image:
    """A 0/1 mask on ``image``'s grid by IBSI mask interpolation: the mask interpolated
    (``roi_interpolation_method``), kept where the value reaches
    ``roi_partial_volume_threshold``. ``image_to_mask`` maps a point of the image's space
    to the mask's (for a mask drawn in another frame: the inverse of a registration that
    maps the mask's points to the image's); default the identity."""
    resampled = sitk.Resample(
        sitk.Cast(mask, sitk.sitkFloat32),
        image,
        image_to_mask or sitk.Transform(3, sitk.sitkIdentity),
        _SITK_INTERPOLATORS[settings.roi_interpolation_method],
        0.0,
        sitk.sitkFloat32,
    )
    return sitk.Cast(resampled >= settings.roi_partial_volume_threshold - 1e-9, sitk.sitkUInt8)


def _interpolate(image: sitk.Image, mask: sitk.Image, settings: FeatureSettings):
    """Resample image and mask to ``new_spacing`` on a grid centred like the original."""
    old_spacing = np.array(image.GetSpacing())
    new_spacing = np.array(settings.new_spacing)
    old_size = np.array(image.GetSize())
    # IBSI grid alignment: keep the grid centre, extent rounded up to whole voxels
    new_size = np.maximum(np.ceil(old_size * old_spacing / new_spacing), 1).astype(int)
    if float(np.prod(new_size.astype(float))) > MAX_VOXELS:
        raise ConfigError(
            f"new_spacing {tuple(new_spacing.tolist())} mm would resample the image to "
            f"{' x '.join(map(str, new_size))} voxels, more than the {MAX_VOXELS:.0e} that "
            "fit in memory: give a coarser spacing (in mm, e.g. 1 1 1)."
        )
    direction = np.array(image.GetDirection()).reshape(3, 3)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint((old_size - 1) / 2.0))
    origin = centre - direction @ ((new_size - 1) / 2.0 * new_spacing)
    grid = sitk.Image([int(s) for s in new_size], sitk.sitkUInt8)
    grid.SetSpacing(new_spacing.tolist())
    grid.SetOrigin(origin.tolist())
    grid.SetDirection(image.GetDirection())
    resampled = sitk.Resample(
        sitk.Cast(image, sitk.sitkFloat64),
        grid,
        sitk.Transform(3, sitk.sitkIdentity),
        _SITK_INTERPOLATORS[settings.interpolation_method],
        float(np.min(sitk.GetArrayViewFromImage(image))),
        sitk.sitkFloat64,
    )
    return resampled, mask_onto_image(mask, grid, settings)


def _crop_box(mask: np.ndarray, spacing_zyx: tuple[float, ...]) -> tuple[slice, ...]:
    """Bounding box of the mask plus a margin covering the local-intensity sphere."""
    nonzero = (
        np.nonzero(mask.any(axis=(1, 2)))[0],
        np.nonzero(mask.any(axis=(0, 2)))[0],
        np.nonzero(mask.any(axis=(0, 1)))[0],
    )
    box = []
    for axis, indices in enumerate(nonzero):
        margin = int(math.ceil(PEAK_RADIUS_MM / spacing_zyx[axis])) + 1
        box.append(
            slice(
                max(int(indices[0]) - margin, 0),
                min(int(indices[-1]) + margin + 1, mask.shape[axis]),
            )
        )
    return tuple(box)
