"""Resampling keeps physical alignment: a known physical point lands on the same intensity."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import (
    centred_grid,
    linear_field_image,
    make_image,
    physical_points,
    rotation_direction,
)

from MultiModalAnalysisLib.errors import (
    ConfigError,
    EmptyImageError,
    GeometryError,
    LabelError,
    NonFiniteImageError,
)
from MultiModalAnalysisLib.preprocess import (
    mask_on_grid,
    resample_to_reference,
    resample_to_spacing,
)

COEFFICIENTS = np.array([0.7, -1.3, 2.1])


def expected_values(image: sitk.Image) -> np.ndarray:
    return physical_points(image) @ COEFFICIENTS + 100.0


def inside_mask(image: sitk.Image, source: sitk.Image, margin: float = 0.6) -> np.ndarray:
    """Voxels of ``image`` whose centre lies well inside ``source``'s voxel grid."""
    points = physical_points(image).reshape(-1, 3)
    index = np.array([source.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points])
    size = np.array(source.GetSize())
    ok = np.all((index >= margin) & (index <= size - 1 - margin), axis=1)
    return ok.reshape(image.GetSize()[::-1])


def test_resample_oblique_anisotropic_onto_other_oblique_grid_keeps_physical_values(
    oblique_image,
):
    target = centred_grid(oblique_image, (22, 26, 20), (1.3, 0.9, 1.7),
                          rotation_direction((-10, 25, -40)))
    resampled = resample_to_reference(oblique_image, target)

    assert resampled.GetSize() == target.GetSize()
    assert np.allclose(resampled.GetDirection(), target.GetDirection())
    inside = inside_mask(resampled, oblique_image)
    assert inside.sum() > 500  # the grids really overlap
    error = np.abs(sitk.GetArrayFromImage(resampled) - expected_values(target))[inside]
    # Linear interpolation of a linear field is exact up to float32 rounding.
    assert error.max() < 1e-2


def test_resample_a_known_point_lands_on_the_same_value(oblique_image):
    target = centred_grid(oblique_image, (14, 18, 15), (2.0, 1.5, 2.5),
                          rotation_direction((5, 5, -60)))
    resampled = resample_to_reference(oblique_image, target)
    point = physical_points(oblique_image)[6, 12, 15]  # a voxel centre of the source
    value_source = sitk.GetArrayFromImage(oblique_image)[6, 12, 15]
    index = target.TransformPhysicalPointToContinuousIndex(point.tolist())
    interpolator = sitk.Resample(resampled, [1, 1, 1], sitk.Transform(), sitk.sitkLinear,
                                 point.tolist(), resampled.GetSpacing(), resampled.GetDirection())
    assert all(0 <= c <= s - 1 for c, s in zip(index, target.GetSize(), strict=True))
    assert abs(sitk.GetArrayFromImage(interpolator).item() - value_source) < 1e-2


def test_resample_to_spacing_keeps_extent_and_values(oblique_image):
    resampled = resample_to_spacing(oblique_image, (0.5, 0.5, 1.5), antialias=False)

    assert resampled.GetSize() == (48, 53, 24)
    lo_in = oblique_image.TransformContinuousIndexToPhysicalPoint((-0.5, -0.5, -0.5))
    lo_out = resampled.TransformContinuousIndexToPhysicalPoint((-0.5, -0.5, -0.5))
    assert np.allclose(lo_in, lo_out, atol=1e-6)  # the outer edge stays put
    inside = inside_mask(resampled, oblique_image)
    error = np.abs(sitk.GetArrayFromImage(resampled) - expected_values(resampled))[inside]
    assert error.max() < 1e-2


def test_labels_are_resampled_with_nearest_neighbour_and_keep_their_type(oblique_image):
    labels = np.zeros(oblique_image.GetSize()[::-1], np.uint8)
    labels[3:9, 5:15, 6:20] = 1
    labels[4:7, 7:10, 8:12] = 3
    label_image = make_image(labels, oblique_image.GetSpacing(), oblique_image.GetOrigin(),
                             oblique_image.GetDirection())

    coarse = resample_to_spacing(label_image, 2.0, is_label=True)
    onto = resample_to_reference(label_image, coarse, is_label=True)

    for result in (coarse, onto):
        assert result.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayFromImage(result))) <= {0, 1, 3}
    # Nearest neighbour keeps the volume of a large label to within a voxel layer.
    volume_in = (labels > 0).sum() * np.prod(oblique_image.GetSpacing())
    volume_out = (sitk.GetArrayFromImage(coarse) > 0).sum() * np.prod(coarse.GetSpacing())
    assert abs(volume_out - volume_in) / volume_in < 0.35


def test_resample_refuses_images_that_do_not_overlap(oblique_image):
    far = make_image(np.zeros((5, 5, 5), np.float32), origin=(500.0, 500.0, 500.0))
    with pytest.raises(GeometryError, match="do(es)? not overlap"):
        resample_to_reference(oblique_image, far, name="MR")


def test_a_mask_is_put_on_another_grid_as_a_binary_mask_in_the_same_place(oblique_image):
    values = np.zeros(oblique_image.GetSize()[::-1], np.int16)
    values[3:9, 5:15, 6:20] = 7  # one label, not 1: the result is still 0/1
    mask = make_image(values, oblique_image.GetSpacing(), oblique_image.GetOrigin(),
                      oblique_image.GetDirection())
    before = sitk.GetArrayFromImage(mask).copy()

    same = mask_on_grid(mask, oblique_image)
    assert same.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(same), (values != 0).astype(np.uint8))

    coarse = resample_to_spacing(oblique_image, 2.0)
    onto = mask_on_grid(mask, coarse, "the tumour mask")
    assert onto.GetSize() == coarse.GetSize() and onto.GetOrigin() == coarse.GetOrigin()
    assert set(np.unique(sitk.GetArrayFromImage(onto))) == {0, 1}
    centre = mask.TransformContinuousIndexToPhysicalPoint((12.5, 9.5, 5.5))
    assert onto[coarse.TransformPhysicalPointToIndex(centre)] == 1
    volume_in = (values != 0).sum() * np.prod(mask.GetSpacing())
    volume_out = sitk.GetArrayFromImage(onto).sum() * np.prod(coarse.GetSpacing())
    assert abs(volume_out - volume_in) / volume_in < 0.35
    assert np.array_equal(sitk.GetArrayFromImage(mask), before)  # the input is untouched


def test_a_mask_that_misses_the_grid_or_holds_several_labels_is_refused(oblique_image):
    values = np.zeros(oblique_image.GetSize()[::-1], np.uint8)
    values[0, 0, 0] = 1  # one corner voxel: outside the smaller grid below
    corner = make_image(values, oblique_image.GetSpacing(), oblique_image.GetOrigin(),
                        oblique_image.GetDirection())
    centre = oblique_image.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2 for n in oblique_image.GetSize()])
    small = make_image(np.zeros((4, 4, 4), np.float32), origin=tuple(np.subtract(centre, 4.0)))
    with pytest.raises(EmptyImageError, match="the tumour mask selects no voxel"):
        mask_on_grid(corner, small, "the tumour mask")
    values[5, 5, 5] = 2
    two = make_image(values, oblique_image.GetSpacing(), oblique_image.GetOrigin(),
                     oblique_image.GetDirection())
    with pytest.raises(LabelError, match="2 different labels"):
        mask_on_grid(two, oblique_image)


def test_resample_to_spacing_rejects_non_positive_spacing(oblique_image):
    with pytest.raises(ConfigError, match="positive"):
        resample_to_spacing(oblique_image, (1.0, 0.0, 1.0))


def test_resample_to_spacing_refuses_a_grid_too_large_to_allocate(oblique_image):
    with pytest.raises(ConfigError, match=r"G-voxel limit\): choose a coarser spacing"):
        resample_to_spacing(oblique_image, 0.001)


def test_resample_does_not_modify_its_input(oblique_image):
    before = sitk.GetArrayFromImage(oblique_image).copy()
    geometry = (oblique_image.GetOrigin(), oblique_image.GetSpacing())
    resample_to_spacing(oblique_image, 2.0)
    assert np.array_equal(sitk.GetArrayFromImage(oblique_image), before)
    assert (oblique_image.GetOrigin(), oblique_image.GetSpacing()) == geometry


def test_linear_field_helper_matches_geometry():
    image = linear_field_image((4, 5, 6), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0),
                               rotation_direction((0, 0, 90)))
    point = image.TransformIndexToPhysicalPoint((2, 3, 4))
    value = sitk.GetArrayFromImage(image)[4, 3, 2]
    assert abs(value - (np.dot(point, COEFFICIENTS) + 100.0)) < 1e-3


def test_resampling_onto_a_coarser_reference_is_anti_aliased_as_to_a_spacing(rng):
    """Noise on a fine grid taken to a 4x coarser grid: ``antialias=True`` smooths about as
    ``resample_to_spacing`` does (close values on the same grid), where plain
    interpolation keeps half the fine grid's noise; onto a finer grid nothing changes."""
    fine = make_image((rng.normal(0, 10, (20, 64, 64)) + 100).astype(np.float32),
                      spacing=(1.0, 1.0, 2.0))
    coarse = resample_to_spacing(fine, [4.0, 4.0, 2.0])  # anti-aliased
    reference = sitk.Image(coarse.GetSize(), sitk.sitkUInt8)
    reference.CopyInformation(coarse)

    plain = sitk.GetArrayFromImage(resample_to_reference(fine, reference))
    smoothed = sitk.GetArrayFromImage(resample_to_reference(fine, reference, antialias=True))
    expected = sitk.GetArrayFromImage(coarse)

    inner = (slice(1, -1), slice(2, -2), slice(2, -2))
    assert plain[inner].std() > 4.0  # linear interpolation only: half the noise left
    assert smoothed[inner].std() < 0.4 * plain[inner].std()
    # sigma sqrt(4^2 - 1^2) / 2 = 1.94 mm against resample_to_spacing's 2 mm
    assert np.abs(smoothed - expected).max() < 0.05 * np.ptp(plain)
    assert smoothed[inner].std() == pytest.approx(expected[inner].std(), rel=0.1)
    with_nan = sitk.Image(fine)
    with_nan[10, 10, 5] = float("nan")
    with pytest.raises(NonFiniteImageError, match="1 NaN"):  # the Gaussian would spread it
        resample_to_reference(with_nan, reference, antialias=True)
    finer = sitk.Image([128, 128, 20], sitk.sitkUInt8)
    finer.SetSpacing([0.5, 0.5, 2.0])
    finer.SetOrigin([-0.25, -0.25, 0.0])
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(resample_to_reference(fine, finer, antialias=True)),
        sitk.GetArrayFromImage(resample_to_reference(fine, finer)))
