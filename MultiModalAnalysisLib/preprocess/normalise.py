"""Intensity normalisation: z-score in a mask, percentile clipping and rescaling, CT windows,
histogram matching to a reference. Every function returns a new float32 image."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError, ConstantImageError, EmptyImageError
from MultiModalAnalysisLib.images import (
    as_float32,
    image_from_array,
    validate_image,
    validate_mask,
)

# (centre, width) in HU; common radiology presets.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "abdomen": (60.0, 400.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (60.0, 150.0),
}


def _values(image: sitk.Image, mask: sitk.Image | None, name: str) -> np.ndarray:
    """The voxel values of ``image`` inside ``mask`` (all voxels without a mask)."""
    array = sitk.GetArrayViewFromImage(image)
    if mask is None:
        return np.asarray(array).ravel()
    mask = validate_mask(mask, f"mask for {name}", reference=image)
    inside = sitk.GetArrayViewFromImage(mask).astype(bool)
    if not inside.any():
        raise EmptyImageError(f"the mask for {name} selects no voxel.")
    return np.asarray(array)[inside]


def zscore(image: sitk.Image, mask: sitk.Image | None = None, *, name: str = "image") -> sitk.Image:
    """Subtract the mean and divide by the standard deviation of the voxels in ``mask``.

    Args:
        image: the image to normalise.
        mask: where to measure mean and standard deviation (whole image if ``None``);
            the whole image is normalised with them.
        name: how to call the image in messages.

    Raises:
        ConstantImageError: the standard deviation in the mask is 0.
    """
    validate_image(image, name)
    values = _values(image, mask, name).astype(np.float64)
    mean, std = float(values.mean()), float(values.std())
    if std == 0.0:
        where = "inside the mask" if mask is not None else ""
        raise ConstantImageError(
            f"standard deviation is 0 for the voxels of {name} {where}: z-score normalisation "
            "is undefined. Check the image and the mask."
        )
    array = (sitk.GetArrayViewFromImage(image).astype(np.float64) - mean) / std
    return image_from_array(array.astype(np.float32), image)


def clip_intensity(image: sitk.Image, low: float | None, high: float | None) -> sitk.Image:
    """Clamp values to ``[low, high]`` (``None``: no bound on that side).

    Raises:
        NonFiniteImageError: the image holds NaN or infinite values (clipping would pass
            them on, or turn an infinity into a bound, without a word).
    """
    if low is not None and high is not None and low > high:
        raise ConfigError(f"clip range is empty: low {low} > high {high}.")
    array = sitk.GetArrayViewFromImage(as_float32(validate_image(image, "the image to clip")))
    return image_from_array(np.clip(array, low, high).astype(np.float32), image)


def percentile_clip(
    image: sitk.Image,
    low_percentile: float = 0.5,
    high_percentile: float = 99.5,
    mask: sitk.Image | None = None,
    *,
    name: str = "image",
) -> sitk.Image:
    """Clamp values to the given percentiles (measured inside ``mask`` when given)."""
    low, high = _percentiles(image, low_percentile, high_percentile, mask, name)
    return clip_intensity(image, low, high)


def rescale_percentiles(
    image: sitk.Image,
    low_percentile: float = 1.0,
    high_percentile: float = 99.0,
    out_min: float = 0.0,
    out_max: float = 1.0,
    *,
    mask: sitk.Image | None = None,
    clip: bool = True,
    name: str = "image",
) -> sitk.Image:
    """Map the ``low``..``high`` percentiles linearly onto ``out_min``..``out_max``.

    This is also contrast stretching. Values beyond the percentiles are clipped unless
    ``clip`` is False.

    Raises:
        ConstantImageError: the two percentiles are equal.
    """
    low, high = _percentiles(image, low_percentile, high_percentile, mask, name)
    if high <= low:
        raise ConstantImageError(
            f"{name}: the {low_percentile} and {high_percentile} percentiles are both {low:g}; "
            "there is no intensity range to stretch. Widen the percentiles or check the image."
        )
    array = sitk.GetArrayViewFromImage(as_float32(image)).astype(np.float64)
    scaled = (array - low) / (high - low)
    if clip:
        scaled = np.clip(scaled, 0.0, 1.0)
    out = out_min + scaled * (out_max - out_min)
    return image_from_array(out.astype(np.float32), image)


def ct_window(
    image: sitk.Image,
    preset: str | None = "soft_tissue",
    *,
    centre: float | None = None,
    width: float | None = None,
    unit_range: bool = False,
) -> sitk.Image:
    """Apply a CT window: clip HU to ``centre +/- width/2``.

    Args:
        image: a CT in Hounsfield units.
        preset: a name from :data:`CT_WINDOWS`; ignored when ``centre`` and ``width`` are given.
        centre, width: an explicit window in HU.
        unit_range: map the window to [0, 1] instead of keeping HU.
    """
    if centre is None or width is None:
        if preset not in CT_WINDOWS:
            raise ConfigError(
                f"unknown CT window '{preset}': use one of {', '.join(CT_WINDOWS)} or give "
                "centre and width."
            )
        centre, width = CT_WINDOWS[preset]
    if width <= 0:
        raise ConfigError(f"CT window width must be > 0 HU, got {width}.")
    low, high = centre - width / 2.0, centre + width / 2.0
    windowed = clip_intensity(image, low, high)
    if not unit_range:
        return windowed
    array = (sitk.GetArrayViewFromImage(windowed) - low) / (high - low)
    return image_from_array(array.astype(np.float32), image)


def histogram_match(
    image: sitk.Image,
    reference: sitk.Image,
    *,
    levels: int = 256,
    match_points: int = 32,
    threshold_at_mean: bool = True,
) -> sitk.Image:
    """Map ``image``'s intensities so its histogram matches ``reference``'s (Nyul-style).

    Args:
        image: the image to remap (its grid is kept).
        reference: the image whose histogram to match (any grid).
        levels: histogram bins.
        match_points: quantiles matched between the two histograms.
        threshold_at_mean: ignore voxels below the mean (background) in both images.
    """
    validate_image(image, "image", require_contrast=True)
    validate_image(reference, "reference", require_contrast=True)
    matcher = sitk.HistogramMatchingImageFilter()
    matcher.SetNumberOfHistogramLevels(int(levels))
    matcher.SetNumberOfMatchPoints(int(match_points))
    matcher.SetThresholdAtMeanIntensity(bool(threshold_at_mean))
    return matcher.Execute(as_float32(image), as_float32(reference))


def _percentiles(
    image: sitk.Image, low: float, high: float, mask: sitk.Image | None, name: str
) -> tuple[float, float]:
    if not 0.0 <= low < high <= 100.0:
        raise ConfigError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}.")
    validate_image(image, name)
    lo, hi = np.percentile(_values(image, mask, name), [low, high])
    return float(lo), float(hi)
