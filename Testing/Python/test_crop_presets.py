"""Cropping with a margin in mm, foreground detection, and the modality presets."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import make_image

from MultiModalAnalysisLib.errors import GeometryError
from MultiModalAnalysisLib.preprocess import (
    apply_modality_preset,
    body_mask,
    crop_to_foreground,
    crop_to_mask,
    foreground_mask,
    preset_for,
    resample_to_spacing,
)


def test_crop_to_mask_adds_the_margin_in_mm_and_keeps_voxel_positions(oblique_image):
    mask_array = np.zeros(oblique_image.GetSize()[::-1], np.uint8)
    mask_array[5:7, 10:14, 12:18] = 1  # z 5..6, y 10..13, x 12..17
    mask = make_image(mask_array, oblique_image.GetSpacing(), oblique_image.GetOrigin(),
                      oblique_image.GetDirection())

    cropped = crop_to_mask(oblique_image, mask, margin_mm=3.0)

    # 3 mm is ceil(3/0.8)=4 voxels in x, ceil(3/1.1)=3 in y, 1 in z (3 mm spacing).
    assert cropped.GetSize() == (6 + 2 * 4, 4 + 2 * 3, 2 + 2 * 1)
    assert np.allclose(cropped.GetDirection(), oblique_image.GetDirection())
    first = cropped.TransformIndexToPhysicalPoint((0, 0, 0))
    assert np.allclose(first, oblique_image.TransformIndexToPhysicalPoint((12 - 4, 10 - 3, 5 - 1)))
    source = sitk.GetArrayFromImage(oblique_image)[4:8, 7:17, 8:22]
    assert np.array_equal(sitk.GetArrayFromImage(cropped), source)


def test_crop_is_clipped_at_the_image_border(oblique_image):
    mask_array = np.zeros(oblique_image.GetSize()[::-1], np.uint8)
    mask_array[0, 0:2, 0:2] = 1
    mask = make_image(mask_array, oblique_image.GetSpacing(), oblique_image.GetOrigin(),
                      oblique_image.GetDirection())
    cropped = crop_to_mask(oblique_image, mask, margin_mm=100.0)
    assert cropped.GetSize() == oblique_image.GetSize()


def test_crop_accepts_a_mask_on_another_grid(oblique_image):
    mask_array = np.zeros(oblique_image.GetSize()[::-1], np.uint8)
    mask_array[4:8, 8:16, 10:20] = 1
    mask = make_image(mask_array, oblique_image.GetSpacing(), oblique_image.GetOrigin(),
                      oblique_image.GetDirection())
    coarse_mask = resample_to_spacing(mask, 2.0, is_label=True)
    cropped_fine = crop_to_mask(oblique_image, mask, 0.0)
    cropped_coarse = crop_to_mask(oblique_image, coarse_mask, 0.0)
    # The coarse mask's box covers the fine one's, within a coarse voxel.
    assert all(c >= f for c, f in zip(cropped_coarse.GetSize(), cropped_fine.GetSize(),
                                      strict=True))
    assert all(c - f <= 6 for c, f in zip(cropped_coarse.GetSize(), cropped_fine.GetSize(),
                                          strict=True))


def test_crop_refuses_a_mask_outside_the_image(oblique_image):
    outside = make_image(np.ones((3, 3, 3), np.uint8), origin=(900.0, 900.0, 900.0))
    with pytest.raises(GeometryError, match="outside"):
        crop_to_mask(oblique_image, outside, 5.0, name="CT")


def test_foreground_mask_finds_the_body_and_fills_its_holes(rng):
    array = rng.normal(0, 2, (12, 40, 40))
    z, y, x = np.meshgrid(*(np.arange(n) for n in array.shape), indexing="ij")
    body = (y - 20) ** 2 + (x - 20) ** 2 < 15**2
    array[body] += 100
    array[(y - 20) ** 2 + (x - 20) ** 2 < 4**2] = 0  # a dark hole inside the body
    image = make_image(array.astype(np.float32))

    mask = sitk.GetArrayFromImage(foreground_mask(image)).astype(bool)
    cropped = crop_to_foreground(image, margin_mm=2.0)

    assert (mask == body).mean() > 0.99
    assert cropped.GetSize()[0] == pytest.approx(29 + 4, abs=1)


def test_presets_by_modality_name(rng):
    assert preset_for("ct").clip_range == (-1024.0, 3071.0)
    assert preset_for("PT").family == "PET" and not preset_for("PET").bias_correction
    assert preset_for("mr-t1").bias_correction and preset_for("FLAIR").zscore_in_foreground
    assert preset_for("ultrasound-doppler").family == "OTHER"

    ct = make_image(rng.uniform(-3024, 4000, (6, 20, 20)).astype(np.int16))
    clipped = sitk.GetArrayFromImage(apply_modality_preset(ct, "CT"))
    assert clipped.min() >= -1024 and clipped.max() <= 3071

    pet = make_image(rng.gamma(2.0, 1.5, (6, 20, 20)).astype(np.float32))
    assert np.array_equal(sitk.GetArrayFromImage(apply_modality_preset(pet, "PET")),
                          sitk.GetArrayFromImage(pet))


def test_mr_preset_corrects_bias_and_zscores_the_body(rng):
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (16, 48, 48)), indexing="ij")
    body = x**2 + y**2 < 0.7
    array = np.where(body, 200.0, 2.0) * (1 + 0.35 * x) + rng.normal(0, 2, x.shape)
    mr = make_image(array.astype(np.float32), spacing=(1.0, 1.0, 2.0))

    out = sitk.GetArrayFromImage(apply_modality_preset(mr, "MR_T1"))

    assert abs(out[body].mean()) < 0.05 and abs(out[body].std() - 1) < 0.05
    raw_cv = array[body].std() / array[body].mean()
    corrected_cv = out[body].std() / (out[body].mean() - out[~body].mean())
    assert corrected_cv < 0.5 * raw_cv


def test_mr_body_is_the_whole_limb_not_its_brightest_tissue(rng):
    """A T1 limb: air, a bright ring of subcutaneous fat, darker muscle, a tumour and dark
    bone. Otsu's threshold splits fat from the rest (the STS crops' case); the body mask,
    and so the MR preset's z-score, covers the whole limb."""
    z, y, x = np.meshgrid(np.arange(12), np.arange(64), np.arange(64), indexing="ij")
    radius = np.hypot(y + 20, x - 32)  # a thigh larger than the crop, its edge in view
    limb = radius < 74
    array = np.where(limb, 90.0, 3.0)  # muscle; air outside
    array[(radius >= 64) & limb] = 400.0  # a band of subcutaneous fat
    array[np.hypot(y - 26, x - 38) < 7] = 150.0  # tumour
    array[np.hypot(y - 20, x - 20) < 4] = 10.0  # cortical bone: as dark as air
    array += rng.normal(0, 3, array.shape)
    mr = make_image(array.astype(np.float32), spacing=(1.0, 1.0, 3.0))

    body = sitk.GetArrayFromImage(body_mask(mr)).astype(bool)
    otsu = sitk.GetArrayFromImage(foreground_mask(mr)).astype(bool)

    assert (body == limb).mean() > 0.99
    assert otsu[limb].mean() < 0.6  # the fat ring only: what the preset used before
    out = sitk.GetArrayFromImage(apply_modality_preset(mr, "MR_T1"))
    assert abs(out[limb].mean()) < 0.05 and abs(out[limb].std() - 1) < 0.05
    assert "above 10 % of the 99.5th percentile" in preset_for("MR_T1").describe()
