"""Quality metrics against analytic values."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import make_image

from MultiModalAnalysisLib.errors import EmptyImageError, GeometryError
from MultiModalAnalysisLib.metrics import (
    dice,
    folding_statistics,
    hausdorff_95,
    jacobian_determinant,
    target_registration_error,
    transform_distance,
)


def box_mask(shape, lo, hi, spacing=(1.0, 1.0, 1.0)) -> sitk.Image:
    array = np.zeros(shape, np.uint8)
    array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    return make_image(array, spacing=spacing)


def test_dice_of_shifted_boxes_is_the_analytic_overlap():
    a = box_mask((20, 20, 20), (5, 5, 5), (15, 15, 15))
    b = box_mask((20, 20, 20), (5, 5, 7), (15, 15, 17))  # shifted 2 voxels in x
    assert dice(a, b) == pytest.approx(2 * 800 / 2000)
    assert dice(a, a) == 1.0


def test_hd95_of_a_shift_equals_the_shift_in_mm():
    spacing = (0.5, 0.5, 2.0)  # x, y, z
    a = box_mask((20, 40, 40), (5, 10, 10), (15, 30, 30), spacing)
    b = box_mask((20, 40, 40), (5, 10, 16), (15, 30, 36), spacing)  # 6 voxels = 3 mm in x
    assert hausdorff_95(a, b) == pytest.approx(3.0, abs=0.3)


def test_metrics_refuse_empty_masks_and_different_grids():
    a = box_mask((10, 10, 10), (2, 2, 2), (5, 5, 5))
    with pytest.raises(EmptyImageError):
        hausdorff_95(a, box_mask((10, 10, 10), (0, 0, 0), (0, 0, 0)))
    with pytest.raises(GeometryError, match="different grids"):
        dice(a, box_mask((10, 10, 12), (2, 2, 2), (5, 5, 5)))


def test_tre_and_transform_distance_of_a_translation():
    shift = sitk.TranslationTransform(3, (3.0, 4.0, 0.0))
    fixed = [(0, 0, 0), (10, 5, -3)]
    moving_true = [(0, 0, 0), (10, 5, -3)]
    assert np.allclose(target_registration_error(shift, fixed, moving_true), 5.0)
    assert np.allclose(transform_distance(shift, sitk.Transform(), fixed), 5.0)


def test_jacobian_of_a_scaling_is_its_determinant_and_folding_is_detected():
    reference = make_image(np.zeros((10, 12, 14), np.float32), spacing=(1.0, 1.5, 2.0))
    scale = sitk.ScaleTransform(3, (1.1, 0.9, 1.2))
    jac = jacobian_determinant(scale, reference)
    stats = folding_statistics(jac)
    assert stats["jacobian_min"] == pytest.approx(1.1 * 0.9 * 1.2, rel=1e-3)
    assert stats["folding_percent"] == 0.0

    # u(x) = -2 x along the first axis gives det(I + grad u) = -1 everywhere: all folded.
    field = np.zeros((10, 12, 14, 3))
    xs = np.arange(14) * 1.0
    field[..., 0] = -2.0 * xs[None, None, :]
    displacement = sitk.GetImageFromArray(field, isVector=True)
    displacement.CopyInformation(reference)
    folded = folding_statistics(
        jacobian_determinant(sitk.DisplacementFieldTransform(displacement), reference)
    )
    assert folded["folding_percent"] > 90.0
    assert folded["jacobian_min"] == pytest.approx(-1.0, abs=1e-3)


def test_jacobian_is_grid_independent_on_an_oblique_anisotropic_grid(oblique_image):
    # A rotation composed with an anisotropic scaling: det = product of the scales everywhere.
    similarity = sitk.AffineTransform(3)
    rotation = np.array(sitk.VersorTransform((0.2, -0.4, 0.5), 0.6).GetMatrix()).reshape(3, 3)
    similarity.SetMatrix((rotation @ np.diag([1.3, 0.8, 1.1])).ravel().tolist())
    jac = sitk.GetArrayFromImage(jacobian_determinant(similarity, oblique_image))
    assert np.allclose(jac, 1.3 * 0.8 * 1.1, rtol=1e-4)
