"""Denoising: Gaussian, median, and the edge-preserving curvature anisotropic diffusion and
bilateral filters. Sizes are in mm so a filter means the same thing on any spacing."""

from __future__ import annotations

import threading

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError
from MultiModalAnalysisLib.filters import execute_filter
from MultiModalAnalysisLib.images import as_float32, validate_image
from MultiModalAnalysisLib.progress import ProgressCallback, check_cancel


def gaussian_smooth(image: sitk.Image, sigma_mm: float = 1.0) -> sitk.Image:
    """Gaussian smoothing with standard deviation ``sigma_mm`` (physical units)."""
    _require_positive("sigma_mm", sigma_mm)
    image = validate_image(image, "the image to smooth")  # (one NaN would spread everywhere)
    return sitk.SmoothingRecursiveGaussian(as_float32(image), float(sigma_mm))


def median_filter(image: sitk.Image, radius_mm: float = 1.0) -> sitk.Image:
    """Median filter over a box of half-width ``radius_mm`` (at least one voxel per axis)."""
    _require_positive("radius_mm", radius_mm)
    image = validate_image(image, "the image to filter")
    radius = [max(1, int(round(radius_mm / s))) for s in image.GetSpacing()]
    return sitk.Median(as_float32(image), radius)


def anisotropic_diffusion(
    image: sitk.Image,
    iterations: int = 5,
    conductance: float = 3.0,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> sitk.Image:
    """Edge-preserving curvature anisotropic diffusion (Whitaker and Xue).

    Args:
        image: the image to smooth (never modified).
        iterations: diffusion iterations; more smooths flat regions further.
        conductance: edge sensitivity; lower keeps weaker edges.
        progress: ``progress(fraction, message)`` callback.
        cancel: stops the filter when set.
    """
    if iterations < 1:
        raise ConfigError(f"iterations must be >= 1, got {iterations}.")
    _require_positive("conductance", conductance)
    image = validate_image(image, "the image to smooth")
    check_cancel(cancel, "anisotropic diffusion")
    diffusion = sitk.CurvatureAnisotropicDiffusionImageFilter()
    diffusion.SetNumberOfIterations(int(iterations))
    diffusion.SetConductanceParameter(float(conductance))
    # The largest stable step for a 3-D image is min spacing / 2^(N+1).
    diffusion.SetTimeStep(float(min(image.GetSpacing())) / 2.0**4)
    return execute_filter(
        diffusion, as_float32(image), what="anisotropic diffusion", progress=progress,
        cancel=cancel,
    )


def bilateral_filter(
    image: sitk.Image, domain_sigma_mm: float = 2.0, range_sigma: float | None = None
) -> sitk.Image:
    """Edge-preserving bilateral filter.

    Args:
        image: the image to smooth.
        domain_sigma_mm: spatial Gaussian width in mm.
        range_sigma: intensity Gaussian width; default twice a robust noise estimate (the
            median absolute deviation of the image minus its 1 mm median filter).
    """
    _require_positive("domain_sigma_mm", domain_sigma_mm)
    image = as_float32(validate_image(image, "the image to smooth"))
    if range_sigma is None:
        range_sigma = 2.0 * estimate_noise_sigma(image)
    _require_positive("range_sigma", range_sigma)
    return sitk.Bilateral(image, float(domain_sigma_mm), float(range_sigma))


def estimate_noise_sigma(image: sitk.Image) -> float:
    """Robust noise standard deviation: 1.4826 x MAD of the high-pass residual."""
    image = as_float32(image)
    residual = sitk.GetArrayViewFromImage(image) - sitk.GetArrayViewFromImage(
        median_filter(image, min(image.GetSpacing()))
    )
    mad = float(np.median(np.abs(residual - np.median(residual))))
    if mad == 0.0:
        mad = float(np.std(residual)) / 1.4826 or 1.0
    return 1.4826 * mad


DENOISERS = {
    "gaussian": gaussian_smooth,
    "median": median_filter,
    "anisotropic": anisotropic_diffusion,
    "bilateral": bilateral_filter,
}


def denoise(image: sitk.Image, method: str = "anisotropic", **options) -> sitk.Image:
    """Denoise with ``method`` (one of :data:`DENOISERS`), passing ``options`` through."""
    try:
        function = DENOISERS[method]
    except KeyError:
        raise ConfigError(
            f"unknown denoising method '{method}': use one of {', '.join(DENOISERS)}."
        ) from None
    try:
        return function(image, **options)
    except TypeError as error:  # an option this method does not take
        raise ConfigError(f"denoising method '{method}': {error}.") from None


def _require_positive(label: str, value: float) -> None:
    try:
        positive = float(value) > 0
    except (TypeError, ValueError):
        positive = False
    if not positive:  # (also refuses NaN)
        raise ConfigError(f"{label} must be > 0, got {value}.")
