"""Normalisation, denoising and enhancement do what they claim, measured."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import make_image

from MultiModalAnalysisLib.errors import ConfigError, ConstantImageError, EmptyImageError
from MultiModalAnalysisLib.preprocess import (
    adaptive_histogram_equalisation,
    anisotropic_diffusion,
    bilateral_filter,
    contrast_stretch,
    ct_window,
    denoise,
    gaussian_smooth,
    histogram_match,
    percentile_clip,
    rescale_percentiles,
    unsharp_mask,
    zscore,
)


@pytest.fixture
def two_tissue(rng) -> tuple[sitk.Image, np.ndarray]:
    """Two half-spaces (50 and 150) with Gaussian noise (sigma 10); x >= 16 is tissue B."""
    array = np.full((16, 32, 32), 50.0)
    array[:, :, 16:] = 150.0
    noisy = array + rng.normal(0, 10.0, array.shape)
    edge = np.zeros(array.shape, bool)
    edge[:, :, 16:] = True
    return make_image(noisy.astype(np.float32), spacing=(1.0, 1.0, 2.0)), edge


def test_zscore_inside_a_mask_gives_mean_zero_and_unit_std_there(two_tissue):
    image, tissue_b = two_tissue
    mask = make_image(tissue_b.astype(np.uint8), spacing=image.GetSpacing())

    normalised = zscore(image, mask)

    values = sitk.GetArrayFromImage(normalised)[tissue_b]
    assert abs(values.mean()) < 1e-4
    assert abs(values.std() - 1.0) < 1e-4
    # Voxels outside the mask are normalised with the same statistics: tissue A ~ -10 sd.
    assert sitk.GetArrayFromImage(normalised)[~tissue_b].mean() == pytest.approx(-10, abs=0.5)


def test_zscore_refuses_a_constant_region():
    flat = make_image(np.full((4, 5, 6), 3.0, np.float32))
    with pytest.raises(ConstantImageError, match="standard deviation is 0"):
        zscore(flat, name="FLAIR")


def test_zscore_refuses_an_empty_mask(two_tissue):
    image, _ = two_tissue
    empty = make_image(np.zeros(image.GetSize()[::-1], np.uint8), spacing=image.GetSpacing())
    with pytest.raises(EmptyImageError, match="empty"):
        zscore(image, empty)


def test_percentile_rescale_maps_percentiles_onto_the_output_range(two_tissue):
    image, _ = two_tissue
    array = sitk.GetArrayFromImage(image)
    p2, p98 = np.percentile(array, [2, 98])

    stretched = contrast_stretch(image, 2, 98)
    scaled = sitk.GetArrayFromImage(rescale_percentiles(image, 2, 98, -1.0, 1.0, clip=False))

    out = sitk.GetArrayFromImage(stretched)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.mean(out == 0.0) == pytest.approx(0.02, abs=0.005)
    assert scaled[array == array.max()] > 1.0  # not clipped
    probe = np.argmin(np.abs(array - p98))
    assert scaled.ravel()[probe] == pytest.approx(1.0, abs=1e-2)
    assert np.percentile(array, 2) == pytest.approx(p2)


def test_percentile_clip_bounds_the_values(two_tissue):
    image, _ = two_tissue
    array = sitk.GetArrayFromImage(image)
    low, high = np.percentile(array, [1, 99])
    clipped = sitk.GetArrayFromImage(percentile_clip(image, 1, 99))
    assert clipped.min() == pytest.approx(low, rel=1e-5)
    assert clipped.max() == pytest.approx(high, rel=1e-5)


def test_ct_window_presets_and_explicit_window():
    hu = make_image(np.linspace(-1200, 2000, 4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6))
    soft = sitk.GetArrayFromImage(ct_window(hu, "soft_tissue"))
    unit = sitk.GetArrayFromImage(ct_window(hu, centre=0, width=200, unit_range=True))
    assert soft.min() == -160 and soft.max() == 240
    assert unit.min() == 0.0 and unit.max() == 1.0
    with pytest.raises(ConfigError, match="unknown CT window"):
        ct_window(hu, "spleen")


def test_histogram_matching_moves_the_histogram_towards_the_reference(rng):
    shape = (12, 40, 40)
    reference = make_image(rng.gamma(4.0, 25.0, shape).astype(np.float32))
    moving = make_image((rng.gamma(2.0, 10.0, shape) + 300).astype(np.float32))

    matched = histogram_match(moving, reference, threshold_at_mean=False)

    def quantile_distance(a: sitk.Image) -> float:
        q = np.linspace(5, 95, 19)
        return float(np.mean(np.abs(np.percentile(sitk.GetArrayFromImage(a), q)
                                    - np.percentile(sitk.GetArrayFromImage(reference), q))))

    before, after = quantile_distance(moving), quantile_distance(matched)
    assert after < 0.1 * before, (before, after)


def noise_and_edge(image: sitk.Image) -> tuple[float, float]:
    """Noise std inside flat tissue, and the step height across the edge at x = 16."""
    array = sitk.GetArrayFromImage(image)
    noise = float(np.mean([array[:, 4:28, 3:12].std(), array[:, 4:28, 20:29].std()]))
    step = float(array[:, :, 17:19].mean() - array[:, :, 13:15].mean())
    return noise, step


@pytest.mark.parametrize("method", ["anisotropic", "bilateral"])
def test_edge_preserving_denoising_lowers_noise_and_keeps_the_edge(two_tissue, method):
    image, _ = two_tissue
    noise_in, step_in = noise_and_edge(image)

    smoothed = denoise(image, method)

    noise_out, step_out = noise_and_edge(smoothed)
    assert noise_out < 0.6 * noise_in, (noise_in, noise_out)
    assert step_out > 0.9 * step_in, (step_in, step_out)


def test_edge_preserving_filters_keep_the_edge_better_than_gaussian(two_tissue):
    image, _ = two_tissue
    gaussian = gaussian_smooth(image, 2.0)
    anisotropic = anisotropic_diffusion(image, iterations=10)
    bilateral = bilateral_filter(image, 2.0)
    step_gauss = noise_and_edge(gaussian)[1]
    assert noise_and_edge(anisotropic)[1] > step_gauss
    assert noise_and_edge(bilateral)[1] > step_gauss


def test_unsharp_mask_raises_edge_gradient_by_the_expected_gain(two_tissue):
    image, _ = two_tissue
    blurred = gaussian_smooth(image, 2.0)

    sharpened = unsharp_mask(blurred, sigma_mm=2.0, amount=1.5)

    def gradient(a: sitk.Image) -> float:
        array = sitk.GetArrayFromImage(a)
        return float(np.abs(np.diff(array[:, :, 14:19].mean(axis=(0, 1)))).max())

    # A step blurred by sigma s has peak gradient ~ 1/s; re-blurring by the same s gives
    # 1/(s*sqrt 2), so unsharp masking raises the peak by 1 + amount * (1 - 1/sqrt 2).
    expected_gain = 1 + 1.5 * (1 - 1 / np.sqrt(2))
    assert gradient(sharpened) / gradient(blurred) == pytest.approx(expected_gain, rel=0.08)


def test_clahe_spreads_a_compressed_histogram(rng):
    # Low-contrast blobs on a ramp: CLAHE should spread the used range of grey levels.
    z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in (16, 48, 48)), indexing="ij")
    array = 100 + 20 * x + 3 * np.sin(12 * y) * np.cos(9 * x) + rng.normal(0, 0.3, x.shape)
    image = make_image(array.astype(np.float32))

    equalised = sitk.GetArrayFromImage(adaptive_histogram_equalisation(image, kernel_mm=12))
    baseline = sitk.GetArrayFromImage(rescale_percentiles(image, 0.5, 99.5))

    def local_contrast(a: np.ndarray) -> float:
        return float(np.mean([a[:, i:i + 8, j:j + 8].std()
                              for i in range(0, 48, 8) for j in range(0, 48, 8)]))

    assert equalised.min() >= 0.0 and equalised.max() <= 1.0
    assert local_contrast(equalised) > 1.5 * local_contrast(baseline)


def test_denoise_rejects_an_unknown_method(two_tissue):
    with pytest.raises(ConfigError, match="unknown denoising method"):
        denoise(two_tissue[0], "wavelet-magic")


def test_filters_and_resampling_refuse_nan_and_2d_images_and_unknown_options(two_tissue):
    """One NaN voxel would spread over the whole image through a Gaussian (or diffusion)."""
    from MultiModalAnalysisLib.errors import ImageDimensionError, NonFiniteImageError
    from MultiModalAnalysisLib.preprocess import (
        crop_to_mask,
        median_filter,
        resample_to_reference,
        resample_to_spacing,
    )

    image = two_tissue[0]
    array = sitk.GetArrayFromImage(image)
    array[5, 5, 5] = np.nan
    with_nan = sitk.GetImageFromArray(array)
    with_nan.CopyInformation(image)
    from MultiModalAnalysisLib.preprocess import clip_intensity, ct_window, unsharp_mask

    for step in (gaussian_smooth, median_filter, anisotropic_diffusion, bilateral_filter,
                 lambda im: resample_to_spacing(im, 2.0), unsharp_mask, ct_window,
                 lambda im: clip_intensity(im, 0.0, 100.0)):
        with pytest.raises(NonFiniteImageError, match="1 NaN or infinite voxel"):
            step(with_nan)
    flat = image[:, :, 3]  # one slice: a 2-D image
    for step in (gaussian_smooth, lambda im: resample_to_spacing(im, 2.0),
                 lambda im: resample_to_reference(im, image)):
        with pytest.raises(ImageDimensionError, match="2-D"):
            step(flat)
    with pytest.raises(ImageDimensionError, match="2-D"):
        crop_to_mask(image, sitk.Cast(flat > 100, sitk.sitkUInt8))
    with pytest.raises(ConfigError, match="denoising method 'gaussian'.*sigma"):
        denoise(image, "gaussian", sigma=2)
    with pytest.raises(ConfigError, match="sigma_mm must be > 0"):
        gaussian_smooth(image, float("nan"))
