"""Resampling onto another image's grid or to a new voxel spacing, geometry kept.

Intensity images are interpolated (linear by default) into float32; label images always use
nearest neighbour and keep their pixel type.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError, EmptyImageError, GeometryError
from MultiModalAnalysisLib.images import (
    as_float32,
    grid_difference,
    physical_bounds,
    physical_corners,
    require_3d,
    same_grid,
    validate_image,
    validate_mask,
    value_range,
)

log = logging.getLogger(__name__)

Interpolator = Literal["linear", "nearest", "bspline", "gaussian"]
INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
    "gaussian": sitk.sitkGaussian,
}


def _interpolator(name: str, is_label: bool) -> int:
    if is_label:
        return sitk.sitkNearestNeighbor
    try:
        return INTERPOLATORS[name]
    except KeyError:
        raise ConfigError(
            f"unknown interpolator '{name}': use one of {', '.join(INTERPOLATORS)}."
        ) from None


def _default_value(image: sitk.Image, is_label: bool, default_value: float | None) -> float:
    if default_value is not None:
        return float(default_value)
    if is_label:
        return 0.0
    return value_range(image)[0]


def resample_to_reference(
    image: sitk.Image,
    reference: sitk.Image,
    *,
    transform: sitk.Transform | None = None,
    interpolator: Interpolator = "linear",
    is_label: bool = False,
    default_value: float | None = None,
    antialias: bool = False,
    name: str = "image",
) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid (size, origin, spacing, direction).

    Args:
        image: the image to resample (never modified).
        reference: the image whose grid the result takes.
        transform: maps a point of the reference's physical space to ``image``'s (ITK
            convention, fixed -> moving); identity when ``None``.
        interpolator: for intensity images; labels always use nearest neighbour.
        is_label: treat ``image`` as a label map (nearest neighbour, pixel type kept).
        default_value: value outside ``image``; the image minimum (0 for labels) by default.
        antialias: for intensity images, first smooth along the axes of ``image`` where the
            reference grid is coarser, about as :func:`resample_to_spacing` does: a Gaussian
            of sigma half of ``sqrt(t^2 - s^2)``, ``t`` the reference's spacing seen along
            that axis (through ``transform``) and ``s`` the image's; none where that is under
            a quarter voxel. So a fine image taken to a coarse grid does not keep the fine
            grid's noise or alias, and a grid merely rotated against the image is not blurred.
        name: how to call the image in messages.

    Raises:
        GeometryError: the image and the reference share no physical space.
    """
    require_3d(image, name)
    require_3d(reference, f"the grid {name} is resampled onto")
    _require_mapped_overlap(image, reference, transform, name)
    source = image
    if antialias and not is_label:
        validate_image(image, name)  # a Gaussian would spread one NaN over the volume
        own = np.array(image.GetSpacing(), dtype=float)
        seen = reference_spacing_along(image, reference, transform)
        # the variance the coarser grid adds (sigma half its spacing, as resample_to_spacing,
        # less what the image's own voxels already average): a grid merely turned against an
        # anisotropic image (2.0 mm seen as 2.03 mm) is not blurred
        sigmas = np.sqrt(np.clip(seen ** 2 - own ** 2, 0.0, None)) / 2.0
        sigmas = np.where(sigmas > 0.25 * own, sigmas, 0.0)
        if np.any(sigmas > 0):
            source = smooth_along_axes(as_float32(image), sigmas)
    resampled = sitk.Resample(
        source if is_label else as_float32(source),
        reference,
        transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity),
        _interpolator(interpolator, is_label),
        _default_value(image, is_label, default_value),
        image.GetPixelID() if is_label else sitk.sitkFloat32,
    )
    return resampled


def mask_on_grid(
    mask: sitk.Image, reference: sitk.Image, name: str = "mask", *, warn: bool = False,
    transform: sitk.Transform | None = None,
) -> sitk.Image:
    """``mask`` as a binary UInt8 image (values 0/1) on ``reference``'s grid.

    The mask is checked (binary, not empty) and, when it is on another grid, resampled onto
    the reference by nearest neighbour. Nothing is modified in place.

    Args:
        mask: a binary label image (0 outside, one value inside).
        reference: the image whose grid the mask must take.
        name: how to call the mask in messages.
        warn: log a warning when the mask has to be resampled (for command lines, where a
            user may not expect it).
        transform: maps a point of the reference's space to the mask's (fixed -> moving):
            a mask drawn on a registered image follows the registration.

    A mask partly outside the reference's field of view is cut to the part inside, with a
    warning that says how much was lost (its volume and shape features are then those of
    that part).

    Raises:
        LabelError: a multi-label or non-integer mask.
        EmptyImageError: the mask selects no voxel, on its own grid or on the reference's
            (it lies outside the reference's field of view, or is thinner than its voxels).
        GeometryError: the mask and the reference share no physical space.
    """
    binary = validate_mask(mask, name)
    if transform is None and same_grid(binary, reference):
        return binary
    if warn:
        log.warning("%s is not on the image's grid (%s): resampling it onto the image "
                    "(nearest neighbour).", name, grid_difference(binary, reference))
    resampled = resample_to_reference(binary, reference, transform=transform, is_label=True,
                                      name=name)
    if transform is None:
        warn_about_voxels_outside(binary, reference, name)
    if not sitk.GetArrayViewFromImage(resampled).any():
        raise EmptyImageError(
            f"{name} selects no voxel of the image grid it belongs to: it lies outside that "
            "image's field of view, or is thinner than its voxels. Check that the mask "
            "belongs to this image."
        )
    return resampled


def voxels_outside(mask: sitk.Image, reference: sitk.Image) -> tuple[int, int]:
    """(voxels of the binary ``mask`` whose centres lie outside ``reference``'s field of
    view, the mask's voxels): what a resampling onto the reference loses."""
    selected = np.argwhere(sitk.GetArrayViewFromImage(mask) != 0)[:, ::-1]  # x, y, z
    if not len(selected):
        return 0, 0
    dimension = mask.GetDimension()

    def index_to_point(image: sitk.Image) -> np.ndarray:
        return (np.asarray(image.GetDirection(), float).reshape(dimension, dimension)
                * np.asarray(image.GetSpacing(), float))

    points = selected @ index_to_point(mask).T + np.asarray(mask.GetOrigin(), float)
    index = ((points - np.asarray(reference.GetOrigin(), float))
             @ np.linalg.inv(index_to_point(reference)).T)
    size = np.asarray(reference.GetSize(), float)
    inside = np.all((index >= -0.5) & (index <= size - 0.5), axis=1)
    return int((~inside).sum()), len(selected)


def warn_about_voxels_outside(mask: sitk.Image, reference: sitk.Image, name: str,
                              where: str = "the image's field of view") -> None:
    """Log a warning when part of ``mask`` lies outside ``reference`` (see
    :func:`voxels_outside`): the region measured there is only the part inside."""
    lost, total = voxels_outside(mask, reference)
    if lost:
        log.warning("%d of the %d voxels of %s (%.0f %%) lie outside %s: only the part "
                    "inside is kept, so its volume and shape are those of that part.",
                    lost, total, name, 100.0 * lost / total, where)


MAX_VOXELS = 1_000_000_000
"""Largest grid resample_to_spacing makes (4 GB as float32): a typo such as 0.05 mm would
otherwise fail deep inside ITK's memory allocation, or exhaust the machine."""


def resample_to_spacing(
    image: sitk.Image,
    spacing: float | Sequence[float | None],
    *,
    interpolator: Interpolator = "linear",
    is_label: bool = False,
    antialias: bool = True,
    default_value: float | None = None,
) -> sitk.Image:
    """Resample to a new voxel spacing over the same physical extent and orientation.

    Args:
        image: the image to resample (never modified).
        spacing: new spacing in mm, one number for all axes or one per axis (``None`` keeps
            that axis's spacing).
        interpolator: for intensity images; labels always use nearest neighbour.
        is_label: treat ``image`` as a label map.
        antialias: Gaussian pre-smoothing along axes that get coarser (intensity images
            only), so downsampling does not alias.
        default_value: value outside the input (image minimum / 0 for labels by default).
    """
    if image.GetNumberOfComponentsPerPixel() == 1:  # (3-D, and NaN would spread)
        image = validate_image(image, "the image to resample")
    else:
        require_3d(image, "the image to resample")
    old_spacing = np.array(image.GetSpacing(), dtype=float)
    new_spacing = _parse_spacing(spacing, old_spacing)
    reference = spacing_grid(image, new_spacing)

    source = image
    if antialias and not is_label:
        source = smooth_along_axes(as_float32(image), antialias_sigmas(old_spacing, new_spacing))

    return sitk.Resample(
        source if is_label else as_float32(source),
        reference,
        sitk.Transform(3, sitk.sitkIdentity),
        _interpolator(interpolator, is_label),
        _default_value(image, is_label, default_value),
        image.GetPixelID() if is_label else sitk.sitkFloat32,
    )


def reference_spacing_along(image: sitk.Image, reference: sitk.Image,
                            transform: sitk.Transform | None = None) -> np.ndarray:
    """The reference grid's spacing seen along each of ``image``'s axes (mm): its own
    spacings when the two share directions, a cosine-weighted mix when they do not. With a
    ``transform`` (reference point -> image point), the reference's voxel steps are taken
    through it first (at the reference's centre), so a grid merely rotated or moved onto
    the image is seen as it is: a rigid motion changes no spacing."""
    own = np.array(image.GetDirection()).reshape(3, 3)
    steps = np.array(reference.GetDirection()).reshape(3, 3) * np.array(reference.GetSpacing())
    if transform is not None:  # columns: one voxel step along each reference axis, in mm
        centre = np.array(reference.TransformContinuousIndexToPhysicalPoint(
            [(n - 1) / 2 for n in reference.GetSize()]))
        base = np.array(transform.TransformPoint(centre.tolist()))
        steps = np.column_stack([np.array(transform.TransformPoint((centre + steps[:, j]).tolist()))
                                 - base for j in range(3)])
    lengths = np.linalg.norm(steps, axis=0)
    cosines = np.abs(own.T @ (steps / lengths))  # [image axis, reference axis]
    return (cosines @ lengths) / cosines.sum(axis=1)


def antialias_sigmas(old_spacing: Sequence[float], new_spacing: Sequence[float]) -> np.ndarray:
    """The Gaussian sigma (mm) per axis that keeps a resampling from ``old_spacing`` to
    ``new_spacing`` from aliasing: half the new spacing along axes that get coarser, 0
    along the others."""
    old, new = np.asarray(old_spacing, dtype=float), np.asarray(new_spacing, dtype=float)
    return np.where(new > old * 1.01, new / 2.0, 0.0)


def smooth_along_axes(image: sitk.Image, sigmas: Sequence[float]) -> sitk.Image:
    """``image`` smoothed by a recursive Gaussian of ``sigmas[axis]`` mm along each axis
    (none where the sigma is 0). Along an axis of fewer than 4 voxels, where ITK's recursive
    filter cannot run (a coarse level of a thin slab), a sampled Gaussian (edges repeated)
    does the same."""
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        if image.GetSize()[axis] >= 4:
            image = sitk.RecursiveGaussian(image, float(sigma), direction=axis)
            continue
        from scipy.ndimage import gaussian_filter1d

        array = gaussian_filter1d(sitk.GetArrayFromImage(image).astype(np.float32),
                                  float(sigma) / image.GetSpacing()[axis],
                                  axis=image.GetDimension() - 1 - axis, mode="nearest")
        smoothed = sitk.GetImageFromArray(array)
        smoothed.CopyInformation(image)
        image = smoothed
    return image


def spacing_grid(image: sitk.Image, spacing: Sequence[float]) -> sitk.Image:
    """The grid ``resample_to_spacing`` makes (an empty UInt8 image): ``image``'s physical
    extent and orientation at ``spacing`` (mm per axis), the outer edge of the first voxel
    kept where it was.

    Raises:
        ConfigError: a spacing that is not 3 positive numbers of mm, or a grid that would
            exceed ``MAX_VOXELS``.
    """
    old_spacing = np.array(image.GetSpacing(), dtype=float)
    new_spacing = _parse_spacing(list(spacing), old_spacing)
    old_size = np.array(image.GetSize(), dtype=float)
    new_size = np.maximum(np.round(old_size * old_spacing / new_spacing), 1).astype(int)
    voxels = int(np.prod(new_size.astype(np.int64)))
    if voxels > MAX_VOXELS:
        raise ConfigError(
            f"resampling to {new_spacing.round(3).tolist()} mm would make a "
            f"{' x '.join(map(str, new_size))} volume ({voxels * 4 / 2**30:.0f} GiB as float32, "
            f"over the {MAX_VOXELS / 1e9:.0f} G-voxel limit): choose a coarser spacing "
            f"(the image's own is {old_spacing.round(3).tolist()} mm)."
        )
    # Shift the centre by half the spacing change, along the image axes.
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    new_origin = np.array(image.GetOrigin()) + direction @ ((new_spacing - old_spacing) / 2)
    reference = sitk.Image([int(s) for s in new_size], sitk.sitkUInt8)
    reference.SetSpacing(new_spacing.tolist())
    reference.SetOrigin(new_origin.tolist())
    reference.SetDirection(image.GetDirection())
    return reference


def _parse_spacing(spacing: float | Sequence[float | None], current: np.ndarray) -> np.ndarray:
    if np.isscalar(spacing):
        values = [float(spacing)] * 3
    else:
        values = list(spacing)
        if len(values) != 3:
            raise ConfigError(f"spacing needs 3 values (x, y, z), got {values}.")
        values = [current[i] if v is None else float(v) for i, v in enumerate(values)]
    result = np.array(values, dtype=float)
    if not np.all(np.isfinite(result)) or np.any(result <= 0):
        raise ConfigError(f"spacing must be positive numbers of mm, got {spacing}.")
    return result


def _require_mapped_overlap(
    image: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None, name: str
) -> None:
    """Refuse a resampling whose output would hold no voxel of the input."""
    corners = physical_corners(reference)
    if transform is not None:
        corners = np.array([transform.TransformPoint(tuple(map(float, p))) for p in corners])
    lo_ref, hi_ref = corners.min(axis=0), corners.max(axis=0)
    lo_img, hi_img = physical_bounds(image)
    overlap = np.minimum(hi_ref, hi_img) - np.maximum(lo_ref, lo_img)
    if np.any(overlap <= 0):
        raise GeometryError(
            f"{name} does not overlap the reference grid in physical space ({name} spans "
            f"{np.round(lo_img, 1).tolist()}..{np.round(hi_img, 1).tolist()} mm; the reference, "
            f"mapped into its space, spans {np.round(lo_ref, 1).tolist()}.."
            f"{np.round(hi_ref, 1).tolist()} mm). Check that both come from the same patient "
            "and frame of reference, or register them first."
        )
