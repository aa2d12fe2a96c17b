"""Images as the optimisers see them: validated, float, outliers clipped, and a pyramid of
smoothed, coarser copies (one per resolution level), with masks to match."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ImageDimensionError
from MultiModalAnalysisLib.images import as_float32, validate_image
from MultiModalAnalysisLib.preprocess import (
    mask_on_grid,
    resample_to_reference,
    resample_to_spacing,
)
from MultiModalAnalysisLib.preprocess.resample import (
    antialias_sigmas,
    smooth_along_axes,
    spacing_grid,
)

# Clipping to these percentiles keeps metal, hot spots and noise spikes from squeezing the
# useful intensities into a few histogram bins (mutual information) or dominating NCC.
CLIP_PERCENTILES = (0.5, 99.5)


MIN_VOXELS_PER_AXIS = 4
"""The fewest voxels along any axis of an image to register: a rigid transform of a slab
thinner than this is not determined along its normal."""


def registration_image(image: sitk.Image, name: str) -> sitk.Image:
    """A float32 copy of ``image`` with intensities clipped to robust percentiles.

    Raises:
        ImageDimensionError: not a 3-D scalar volume, or fewer than ``MIN_VOXELS_PER_AXIS``
            voxels along an axis (a single slice saved as a 3-D file).
        EmptyImageError, NonFiniteImageError, ConstantImageError.
    """
    image = validate_image(image, name, require_contrast=True)
    size = image.GetSize()
    if min(size) < MIN_VOXELS_PER_AXIS:
        thin = "xyz"[int(np.argmin(size))]
        what = ("A single slice is a 2-D image; register the whole volume it comes from."
                if min(size) == 1 else
                f"{min(size)} slices are too thin a slab to register in 3-D; register the "
                "whole volume they come from.")
        raise ImageDimensionError(
            f"{name} has only {min(size)} voxel(s) along {thin} (size "
            f"{' x '.join(map(str, size))}): 3-D registration needs at least "
            f"{MIN_VOXELS_PER_AXIS} voxels along every axis. {what}"
        )
    array = sitk.GetArrayViewFromImage(image)
    step = max(1, array.size // 200_000)  # percentiles of a subsample are plenty
    low, high = np.percentile(array.ravel()[::step], CLIP_PERCENTILES)
    if high <= low:
        low, high = float(array.min()), float(array.max())
    return sitk.Clamp(as_float32(image), sitk.sitkFloat32, float(low), float(high))


def registration_mask(mask: sitk.Image | None, image: sitk.Image, name: str) -> sitk.Image | None:
    """A binary UInt8 mask on ``image``'s grid (resampled if it is on another grid).

    Raises:
        EmptyImageError: the mask selects no voxel (also after resampling).
        LabelError: a multi-label or non-integer mask.
    """
    return None if mask is None else mask_on_grid(mask, image, name)


REGION_FRACTION = 0.5
"""A user's mask that covers less than this share of its image (a lesion, an organ, a box
around them; not a body mask) is a *region of interest*: it gets a margin
(``REGION_MARGIN_MM``), the search for a start scores the whole images instead, and the
stages after it sample the side whose scored part is smaller and bin intensities by what
the region shows (``search.SearchSpace.from_level``). The constant-fill masks are never
regions."""
REGION_MARGIN_MM = 10.0
"""The margin a region of interest gets by default. The inside of a lesion is often nearly
uniform on one modality (a soft-tissue sarcoma on CT), so its voxels alone barely constrain
a cross-modal alignment. PET to CT with the GTV as the fixed mask, 20 STS patients: 7 ended
over 10 mm off with the GTV alone, 3 with 10 mm around it, none without a mask
(``docs/benchmarks.md``, lesion-mask run)."""


def is_region(mask: sitk.Image | None) -> bool:
    """Whether ``mask`` is a region of interest (see ``REGION_FRACTION``)."""
    return mask is not None and float(sitk.GetArrayViewFromImage(mask).mean()) < REGION_FRACTION


def region_margin(mask: sitk.Image | None, margin_mm: float | None) -> float:
    """The margin (mm) a registration mask gets: ``margin_mm`` when given, else
    ``REGION_MARGIN_MM`` for a region of interest and 0 for a larger mask."""
    if mask is None:
        return 0.0
    if margin_mm is not None:
        return float(margin_mm)
    return REGION_MARGIN_MM if is_region(mask) else 0.0


def grow_mask(mask: sitk.Image, margin_mm: float) -> sitk.Image:
    """A binary mask grown by ``margin_mm`` (physical distance: anisotropic voxels are
    handled), on its own grid; the mask itself when the margin is 0."""
    if margin_mm <= 0:
        return mask
    array = sitk.GetArrayViewFromImage(mask) > 0
    index = np.argwhere(array)
    reach = np.ceil(margin_mm / np.array(mask.GetSpacing())[::-1]).astype(int) + 1
    low = np.maximum(index.min(axis=0) - reach, 0)
    high = np.minimum(index.max(axis=0) + reach + 1, array.shape)
    box = sitk.RegionOfInterest(sitk.Cast(mask > 0, sitk.sitkUInt8),
                                [int(n) for n in (high - low)[::-1]],
                                [int(i) for i in low[::-1]])  # only where it can grow
    distance = sitk.SignedMaurerDistanceMap(box, insideIsPositive=False,
                                            squaredDistance=False, useImageSpacing=True)
    grown = np.zeros(array.shape, np.uint8)
    grown[tuple(slice(a, b) for a, b in zip(low, high, strict=True))] = (
        sitk.GetArrayViewFromImage(distance) <= margin_mm)
    result = sitk.GetImageFromArray(grown)
    result.CopyInformation(mask)
    return result


def fill_mask(image: sitk.Image, min_fraction: float = 0.01) -> sitk.Image | None:
    """Where ``image`` shows the patient rather than constant fill, or None if it has none.

    Volumes resampled into another frame (an MR aligned to a CT, a perturbed copy) carry
    regions of constant fill outside their original field of view. Left in, the metric tries
    to line the edges of that fill up with edges of the other image. Fill is taken to be a
    region that is flat at the image minimum and touches the border; real air has noise, so
    it is rarely exactly flat. The mask is returned on a grid of about 3 mm (enough for the
    pyramid levels, and fast); ``build_pyramid`` resamples it per level.
    """
    array = sitk.GetArrayViewFromImage(image)
    at_min = array == array.min()
    if at_min.mean() < min_fraction:
        return None
    at_min_image = sitk.GetImageFromArray(at_min.astype(np.float32))
    at_min_image.CopyInformation(image)
    factors = [max(1, int(round(3.0 / s))) for s in image.GetSpacing()]
    flat = sitk.BinShrink(at_min_image, factors) > 0.999
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(flat))
    border = np.unique(np.concatenate([
        components[[0, -1]].ravel(), components[:, [0, -1]].ravel(),
        components[:, :, [0, -1]].ravel()]))
    fill = np.isin(components, border[border != 0])
    if fill.mean() < min_fraction:
        return None
    valid = sitk.GetImageFromArray((~fill).astype(np.uint8))
    valid.CopyInformation(flat)
    return valid


@dataclass
class Level:
    """One resolution level: the fixed and moving images and masks on coarser grids."""

    spacing_mm: float
    fixed: sitk.Image
    moving: sitk.Image
    fixed_mask: sitk.Image | None
    moving_mask: sitk.Image | None
    prepared: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    """Work derived from this level's images, kept for every scorer of the level (the
    search's prepared target volume per bin count, see ``search.SearchSpace.from_level``)."""
    fixed_region: bool = False
    """The fixed mask is a user's region of interest (not a body or fill mask), to be
    sampled and binned as one (``search.SearchSpace.from_level``)."""
    moving_region: bool = False

    @property
    def fixed_voxels(self) -> int:
        if self.fixed_mask is not None:
            return int(sitk.GetArrayViewFromImage(self.fixed_mask).sum())
        return int(np.prod(self.fixed.GetSize()))


def level_spacing(image: sitk.Image, spacing_mm: float) -> list[float]:
    """The spacing of ``image`` at a level: ``spacing_mm`` but never finer than the image."""
    return [max(float(spacing_mm), s) for s in image.GetSpacing()]


def thin_capped(image: sitk.Image, spacing: Sequence[float]) -> list[float]:
    """``spacing`` finer along any axis where it would leave fewer than
    ``MIN_VOXELS_PER_AXIS`` voxels over the image's extent (a thin slab on a coarse level),
    but never finer than the image there."""
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    cap = np.maximum(extent / MIN_VOXELS_PER_AXIS, image.GetSpacing())
    return [float(min(s, c)) for s, c in zip(spacing, cap, strict=True)]


def downsample(image: sitk.Image, spacing: Sequence[float]) -> sitk.Image:
    """``image`` smoothed and resampled to ``spacing`` (unchanged if it already has it).

    The smoothing is ``resample_to_spacing``'s anti-aliasing (a Gaussian of sigma half the
    new spacing along each axis that gets coarser). Along axes at least twice as coarse, most
    of it is done first by averaging blocks of whole voxels (``BinShrink``, a single pass;
    blocks no wider than half the new spacing), and the Gaussian then adds only the variance
    the block lacks, on the smaller grid. Same anti-aliasing, to within the kernel's shape,
    at a third to a sixth of the time on a full-resolution CT (4 mm level).
    """
    old = np.array(image.GetSpacing(), dtype=float)
    new = np.array(spacing, dtype=float)
    if np.allclose(new, old, rtol=0.02):
        return image
    factors = np.maximum(1, np.floor(new / (2 * old) + 1e-6)).astype(int)
    if factors.max() == 1:
        return resample_to_spacing(image, new.tolist())
    reference = spacing_grid(image, new)
    source = as_float32(image)
    pad = (-np.array(image.GetSize())) % factors  # whole blocks: repeat the last voxels
    if pad.any():
        source = sitk.ZeroFluxNeumannPad(source, [0, 0, 0], [int(p) for p in pad])
    source = sitk.BinShrink(source, [int(f) for f in factors])
    block_variance = ((factors * old) ** 2 - old ** 2) / 12  # f samples, ``old`` apart
    sigmas = antialias_sigmas(old, new)  # resample_to_spacing's Gaussian, less the block's
    residual = np.sqrt(np.clip(sigmas ** 2 - block_variance, 0.0, None))
    source = smooth_along_axes(source, np.where(sigmas > 0, residual, 0.0))
    minimum = float(sitk.GetArrayViewFromImage(source).min())
    return sitk.Resample(source, reference, sitk.Transform(3, sitk.sitkIdentity),
                         sitk.sitkLinear, minimum, sitk.sitkFloat32)


def downsample_mask(mask: sitk.Image | None, image: sitk.Image, erode: int = 0,
                    ) -> sitk.Image | None:
    """A mask on a level image's grid: linear resampling then a generous threshold, so thin
    regions do not vanish on a coarse grid; then ``erode`` voxels peeled off its edge."""
    if mask is None:
        return None
    fraction = resample_to_reference(sitk.Cast(mask, sitk.sitkFloat32), image, default_value=0)
    level_mask = sitk.Cast(fraction > 0.25, sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(level_mask).any():
        level_mask = sitk.Cast(fraction > 0.0, sitk.sitkUInt8)
    if erode:
        eroded = sitk.BinaryErode(level_mask, [erode] * 3, sitk.sitkBall, 0, 1)
        if sitk.GetArrayViewFromImage(eroded).any():
            level_mask = eroded
    return level_mask


def build_pyramid(
    fixed: sitk.Image,
    moving: sitk.Image,
    spacings_mm: Sequence[float],
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    *,
    erode_fixed: int = 0,
    erode_moving: int = 0,
    regions: tuple[bool, bool] = (False, False),
) -> list[Level]:
    """One :class:`Level` per spacing, returned coarse to fine.

    ``erode_*`` peel voxels off a mask's edge on every level: for masks of the valid field
    of view, so that no sample sits where smoothing or the gradient mixes in the fill.
    ``regions`` says which masks (fixed, moving) are regions of interest.
    """
    # Finest level first, each coarser one from the one before: the full-resolution images
    # are smoothed only once.
    levels = []
    f, m = fixed, moving
    for spacing in sorted(spacings_mm):
        # The fixed grid is isotropic even where that means finer slices than the scan:
        # with both images on the same slice positions (common after a resampling),
        # samples on the fixed slices favour shifts by whole slices (the interpolation
        # artefact of mutual information); off-grid samples do not.
        f = downsample(f, thin_capped(fixed, [float(spacing)] * 3))
        m = downsample(m, thin_capped(moving, level_spacing(m, spacing)))
        levels.append(
            Level(float(spacing), f, m, downsample_mask(fixed_mask, f, erode_fixed),
                  downsample_mask(moving_mask, m, erode_moving),
                  fixed_region=regions[0], moving_region=regions[1])
        )
    return levels[::-1]


def with_masks(levels: Sequence[Level], fixed_mask: sitk.Image | None,
               moving_mask: sitk.Image | None, *, erode_fixed: int = 0,
               erode_moving: int = 0) -> list[Level]:
    """The same levels (sharing their images) with other masks, none of them a region of
    interest."""
    return [Level(level.spacing_mm, level.fixed, level.moving,
                  downsample_mask(fixed_mask, level.fixed, erode_fixed),
                  downsample_mask(moving_mask, level.moving, erode_moving))
            for level in levels]


def image_centre(image: sitk.Image) -> np.ndarray:
    """Physical centre of the image's voxel grid."""
    return np.array(
        image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
    )


def centre_of_mass(image: sitk.Image, mask: sitk.Image | None = None) -> np.ndarray:
    """Intensity-weighted physical centre (intensities shifted to start at 0), in ``mask``."""
    array = sitk.GetArrayViewFromImage(image).astype(np.float64)
    weights = array - array.min()
    if mask is not None:
        weights = weights * (sitk.GetArrayViewFromImage(mask) > 0)
    total = weights.sum()
    if total <= 0:
        return image_centre(image)
    index = [
        float((weights.sum(axis=tuple(a for a in range(3) if a != axis))
               * np.arange(weights.shape[axis])).sum() / total)
        for axis in (2, 1, 0)
    ]
    return np.array(image.TransformContinuousIndexToPhysicalPoint(index))
