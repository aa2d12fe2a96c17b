"""Preprocessing: resampling, bias-field correction, denoising, enhancement, normalisation,
cropping and per-modality presets. Every function returns a new image with the input's
geometry (or the reference grid it was asked for); label images are always resampled with
nearest neighbour."""

from MultiModalAnalysisLib.preprocess.bias import estimate_bias_field, n4_bias_correction
from MultiModalAnalysisLib.preprocess.crop import (
    apply_mask,
    body_mask,
    crop_to_foreground,
    crop_to_mask,
    foreground_mask,
)
from MultiModalAnalysisLib.preprocess.denoise import (
    DENOISERS,
    anisotropic_diffusion,
    bilateral_filter,
    denoise,
    estimate_noise_sigma,
    gaussian_smooth,
    median_filter,
)
from MultiModalAnalysisLib.preprocess.enhance import (
    adaptive_histogram_equalisation,
    contrast_stretch,
    unsharp_mask,
)
from MultiModalAnalysisLib.preprocess.normalise import (
    CT_WINDOWS,
    clip_intensity,
    ct_window,
    histogram_match,
    percentile_clip,
    rescale_percentiles,
    zscore,
)
from MultiModalAnalysisLib.preprocess.presets import (
    PRESETS,
    ModalityPreset,
    apply_modality_preset,
    preset_for,
)
from MultiModalAnalysisLib.preprocess.resample import (
    INTERPOLATORS,
    mask_on_grid,
    resample_to_reference,
    resample_to_spacing,
)

__all__ = [
    "CT_WINDOWS",
    "DENOISERS",
    "INTERPOLATORS",
    "PRESETS",
    "ModalityPreset",
    "adaptive_histogram_equalisation",
    "anisotropic_diffusion",
    "apply_mask",
    "apply_modality_preset",
    "bilateral_filter",
    "body_mask",
    "clip_intensity",
    "contrast_stretch",
    "crop_to_foreground",
    "crop_to_mask",
    "ct_window",
    "denoise",
    "estimate_bias_field",
    "estimate_noise_sigma",
    "foreground_mask",
    "gaussian_smooth",
    "histogram_match",
    "mask_on_grid",
    "median_filter",
    "n4_bias_correction",
    "percentile_clip",
    "preset_for",
    "resample_to_reference",
    "resample_to_spacing",
    "rescale_percentiles",
    "unsharp_mask",
    "zscore",
]
