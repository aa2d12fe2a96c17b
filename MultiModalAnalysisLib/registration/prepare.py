"""Images as the optimisers see them: validated, float, outliers clipped, and a pyramid of
smoothed, coarser copies (one per resolution level), with masks to match."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

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


def registration_image(image: sitk.Image, name: str) -> sitk.Image:
    """A float32 copy of ``image`` with intensities clipped to robust percentiles.

    Raises:
        ImageDimensionError, EmptyImageError, NonFiniteImageError, ConstantImageError.
    """
    image = validate_image(image, name, require_contrast=True)
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

    @property
    def fixed_voxels(self) -> int:
        if self.fixed_mask is not None:
            return int(sitk.GetArrayViewFromImage(self.fixed_mask).sum())
        return int(np.prod(self.fixed.GetSize()))


def level_spacing(image: sitk.Image, spacing_mm: float) -> list[float]:
    """The spacing of ``image`` at a level: ``spacing_mm`` but never finer than the image."""
    return [max(float(spacing_mm), s) for s in image.GetSpacing()]


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
) -> list[Level]:
    """One :class:`Level` per spacing, returned coarse to fine.

    ``erode_*`` peel voxels off a mask's edge on every level: for masks of the valid field
    of view, so that no sample sits where smoothing or the gradient mixes in the fill.
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
        f = downsample(f, [float(spacing)] * 3)
        m = downsample(m, level_spacing(m, spacing))
        levels.append(
            Level(float(spacing), f, m, downsample_mask(fixed_mask, f, erode_fixed),
                  downsample_mask(moving_mask, m, erode_moving))
        )
    return levels[::-1]


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
