"""N4 bias-field correction removes a synthetic multiplicative bias, and can be cancelled."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import make_image

from MultiModalAnalysisLib.errors import (
    ConstantImageError,
    ImageDimensionError,
    OperationCancelled,
)
from MultiModalAnalysisLib.preprocess import estimate_bias_field, n4_bias_correction


def biased_phantom(rng: np.random.Generator) -> tuple[sitk.Image, np.ndarray]:
    """A uniform ellipsoid (tissue 100, 2% noise) times a smooth 0.6..1.4 bias field."""
    shape = (40, 64, 64)  # z, y, x at 1.5 x 1 x 1 mm
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    tissue = (x**2 / 0.8 + y**2 / 0.7 + z**2 / 0.9) < 0.8
    field = 1.0 + 0.3 * x + 0.15 * y - 0.1 * z**2 + 0.1 * x * y
    clean = np.where(tissue, 100.0, 5.0) + rng.normal(0, 2.0, shape)
    image = make_image((clean * field).astype(np.float32), spacing=(1.0, 1.0, 1.5),
                       origin=(10.0, -20.0, 5.0))
    return image, tissue


def coefficient_of_variation(image: sitk.Image, region: np.ndarray) -> float:
    values = sitk.GetArrayFromImage(image)[region]
    return float(values.std() / values.mean())


def test_n4_halves_the_coefficient_of_variation_inside_uniform_tissue(rng):
    image, tissue = biased_phantom(rng)
    cv_before = coefficient_of_variation(image, tissue)

    corrected = n4_bias_correction(image)

    cv_after = coefficient_of_variation(corrected, tissue)
    assert cv_before > 0.1  # the bias really is there
    assert cv_after <= 0.5 * cv_before, (cv_before, cv_after)
    assert corrected.GetSize() == image.GetSize()
    assert corrected.GetOrigin() == image.GetOrigin()


def test_n4_uses_the_given_mask_and_reports_progress(rng):
    image, tissue = biased_phantom(rng)
    mask = make_image(tissue.astype(np.uint8), image.GetSpacing(), image.GetOrigin())
    reports: list[float] = []

    field = estimate_bias_field(image, mask, progress=lambda f, m: reports.append(f))

    inside = sitk.GetArrayFromImage(field)[tissue]
    assert 0.8 < inside.mean() < 1.25
    assert reports and reports[-1] == 1.0
    assert all(b >= a for a, b in zip(reports, reports[1:], strict=False))


def test_n4_stops_when_cancelled(rng):
    image, _ = biased_phantom(rng)
    cancel = threading.Event()
    reports: list[float] = []

    def cancel_after_first_report(fraction: float, message: str) -> None:
        reports.append(fraction)
        cancel.set()

    with pytest.raises(OperationCancelled):
        n4_bias_correction(image, progress=cancel_after_first_report, cancel=cancel)
    # It stopped at the first iteration instead of running its 130 iterations to the end.
    assert len(reports) == 1


def test_n4_refuses_a_constant_image():
    flat = make_image(np.full((10, 12, 12), 7.0, np.float32))
    with pytest.raises(ConstantImageError, match="constant"):
        n4_bias_correction(flat, name="T1 scan")


def test_n4_refuses_a_single_slice_with_a_project_error(rng):
    # ITK's own failure here is "Zero-valued spacing is not supported"; the MR preset (and
    # the Slicer module's Preprocess) must say what is wrong instead.
    from MultiModalAnalysisLib.preprocess import apply_modality_preset

    one_slice = make_image(rng.normal(100, 20, (1, 40, 40)).astype(np.float32))
    with pytest.raises(ImageDimensionError, match="single slice"):
        apply_modality_preset(one_slice, "MR_T1")
    two = n4_bias_correction(make_image(rng.normal(100, 20, (2, 40, 40)).astype(np.float32)))
    assert two.GetSize() == (40, 40, 2)
