"""Feature values that can be worked out by hand: shapes, constant and random images, and
the vectorised matrix builders against plain loops on small random volumes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import stats
from synthetic import make_image

from MultiModalAnalysisLib.features import FeatureSettings, extract_features
from MultiModalAnalysisLib.features.glcm import cooccurrence_counts
from MultiModalAnalysisLib.features.glrlm import run_length_counts
from MultiModalAnalysisLib.features.neighbours import unique_directions
from MultiModalAnalysisLib.features.ngtdm import tone_differences
from MultiModalAnalysisLib.features.zones import border_distance, find_zones

SHAPE_ONLY = {"families": ["morph"], "non_standard_features": False}


def ball(radius: float, size: int) -> np.ndarray:
    z, y, x = np.mgrid[:size, :size, :size] - (size - 1) / 2
    return (x**2 + y**2 + z**2 <= radius**2).astype(np.uint8)


def textured(mask: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> sitk.Image:
    """Some texture inside the mask (a constant region has no Moran's I)."""
    values = 100.0 + 10.0 * np.sin(np.arange(mask.size)).reshape(mask.shape)
    return make_image(np.where(mask > 0, values, 0.0).astype(np.float32), spacing)


def cube_image(n: int, spacing=(1.0, 1.0, 1.0)):
    mask = np.zeros((n + 4,) * 3, np.uint8)
    mask[2 : n + 2, 2 : n + 2, 2 : n + 2] = 1
    return textured(mask, spacing), make_image(mask, spacing)


def test_cube_volume_and_surface_are_those_of_the_cube_less_its_rounded_edges():
    n = 10
    image, mask = cube_image(n)
    values = extract_features({"cube": image}, mask, SHAPE_ONLY, device="cpu")
    assert values["cube_morph_vol_approx"] == pytest.approx(n**3)
    # marching cubes cuts the 12 edges at 45 degrees (prisms of 1/8 mm^2 section) and the
    # 8 corners: a little under n^3 and under 6 n^2
    assert n**3 - 12 * n * 0.125 - 1 < values["cube_morph_volume"] < n**3
    edge_loss = 12 * n * (1 - math.sqrt(0.5))
    assert 6 * n**2 - edge_loss - 2 < values["cube_morph_area_mesh"] < 6 * n**2 - edge_loss + 6
    assert values["cube_morph_vol_dens_aabb"] == pytest.approx(values["cube_morph_volume"] / n**3)


def test_mesh_volume_scales_with_the_voxel_volume_on_anisotropic_grids():
    unit = extract_features({"c": cube_image(8)[0]}, cube_image(8)[1], SHAPE_ONLY, device="cpu")
    image, mask = cube_image(8, spacing=(0.5, 2.0, 3.0))
    scaled = extract_features({"c": image}, mask, SHAPE_ONLY, device="cpu")
    assert scaled["c_morph_volume"] == pytest.approx(3.0 * unit["c_morph_volume"], rel=1e-9)
    assert scaled["c_morph_vol_approx"] == pytest.approx(3.0 * 8**3)


def test_sphere_volume_surface_and_axes_match_the_formulas():
    radius = 12.0
    mask_array = ball(radius, 31)
    mask = make_image(mask_array)
    values = extract_features({"s": textured(mask_array)}, mask, SHAPE_ONLY, device="cpu")
    # the voxels inside the ball; the mesh through voxel-edge midpoints cuts a little off
    assert values["s_morph_vol_approx"] == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.02)
    assert values["s_morph_volume"] == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.03)
    assert values["s_morph_area_mesh"] == pytest.approx(4 * math.pi * radius**2, rel=0.08)
    assert 0.9 < values["s_morph_sphericity"] <= 1.0
    # a solid ball's coordinate variance is r^2 / 5 along every axis
    assert values["s_morph_pca_maj_axis"] == pytest.approx(4 * radius / math.sqrt(5), rel=0.02)
    assert values["s_morph_pca_elongation"] > 0.99
    assert values["s_morph_diam"] == pytest.approx(2 * radius + 1, abs=1.0)
    assert 0.94 < values["s_morph_vol_dens_conv_hull"] < 1.0


def test_constant_image_has_a_single_cell_co_occurrence_matrix():
    mask_array = np.zeros((8, 10, 10), np.uint8)
    mask_array[2:6, 2:8, 2:8] = 1
    image = make_image(np.full(mask_array.shape, 7.0, np.float32))
    settings = {"families": ["cm"], "discretisation_method": "fixed_bin_number"}
    with pytest.warns(UserWarning, match="undefined"):  # correlation: zero variance
        values = extract_features({"c": image}, make_image(mask_array), settings, device="cpu")
    for level in ("2D_avg", "2_5D_comb", "3D_avg", "3D_comb"):
        assert values[f"c_cm_joint_max_{level}"] == 1.0
        assert values[f"c_cm_energy_{level}"] == 1.0
        assert values[f"c_cm_joint_entr_{level}"] == 0.0
        assert values[f"c_cm_contrast_{level}"] == 0.0
        assert values[f"c_cm_inv_diff_{level}"] == 1.0
        assert values[f"c_cm_joint_avg_{level}"] == 1.0  # everything in the first bin
        assert math.isnan(values[f"c_cm_corr_{level}"])


def test_intensity_statistics_match_numpy_and_scipy(rng):
    array = rng.normal(40.0, 12.0, (12, 14, 16)).astype(np.float64)
    mask_array = (rng.random(array.shape) > 0.3).astype(np.uint8)
    values = extract_features(
        {"r": make_image(array)}, make_image(mask_array), {"families": ["stat"]}, device="cpu"
    )
    x = array[mask_array > 0]
    assert values["r_stat_mean"] == pytest.approx(x.mean())
    assert values["r_stat_var"] == pytest.approx(x.var())
    assert values["r_stat_skew"] == pytest.approx(stats.skew(x))
    assert values["r_stat_kurt"] == pytest.approx(stats.kurtosis(x))
    for q, name in ((10, "p10"), (50, "median"), (90, "p90")):
        assert values[f"r_stat_{name}"] == pytest.approx(np.percentile(x, q))
    iqr = np.percentile(x, 75) - np.percentile(x, 25)
    assert values["r_stat_iqr"] == pytest.approx(iqr)
    assert values["r_stat_medad"] == pytest.approx(np.abs(x - np.median(x)).mean())
    assert values["r_stat_energy"] == pytest.approx((x**2).sum())


def test_integer_percentiles_from_counts_equal_sorting(rng):
    array = rng.integers(-200, 300, (10, 12, 12)).astype(np.int16)
    mask = make_image(np.ones(array.shape, np.uint8))
    values = extract_features({"ct": make_image(array)}, mask, {"families": ["stat"]}, "cpu")
    for q, name in ((10, "p10"), (50, "median"), (90, "p90")):
        assert values[f"ct_stat_{name}"] == pytest.approx(np.percentile(array, q))


def random_grey(rng, shape=(5, 7, 6), levels=4) -> torch.Tensor:
    grey = rng.integers(1, levels + 1, shape)
    grey[rng.random(shape) < 0.25] = 0  # holes: outside the ROI
    return torch.as_tensor(grey, dtype=torch.int64)


def loop_cooccurrence(grey: np.ndarray, levels: int, direction) -> np.ndarray:
    counts = np.zeros((levels, levels), np.int64)
    for p in itertools.product(*map(range, grey.shape)):
        q = tuple(a + b for a, b in zip(p, direction, strict=True))
        inside = all(0 <= c < n for c, n in zip(q, grey.shape, strict=True))
        if inside and grey[p] > 0 and grey[q] > 0:
            counts[grey[p] - 1, grey[q] - 1] += 1
            counts[grey[q] - 1, grey[p] - 1] += 1
    return counts


def loop_runs(grey: np.ndarray, levels: int, direction) -> np.ndarray:
    counts = np.zeros((levels, max(grey.shape)), np.int64)
    for p in itertools.product(*map(range, grey.shape)):
        before = tuple(a - b for a, b in zip(p, direction, strict=True))
        inside = all(0 <= c < n for c, n in zip(before, grey.shape, strict=True))
        if grey[p] == 0 or (inside and grey[before] == grey[p]):
            continue  # not the start of a run
        length, q = 1, tuple(a + b for a, b in zip(p, direction, strict=True))
        while all(0 <= c < n for c, n in zip(q, grey.shape, strict=True)) and grey[q] == grey[p]:
            length += 1
            q = tuple(a + b for a, b in zip(q, direction, strict=True))
        counts[grey[p] - 1, length - 1] += 1
    return counts


def test_vectorised_cooccurrence_and_run_counts_equal_plain_loops_in_all_13_directions(rng):
    grey = random_grey(rng)
    directions = unique_directions(False)
    cooccurrence = cooccurrence_counts(grey, 4, directions, 1, by_slice=False)
    runs = run_length_counts(grey, 4, directions, by_slice=False)
    for number, direction in enumerate(directions):
        expected = loop_cooccurrence(grey.numpy(), 4, direction)
        assert torch.equal(cooccurrence[number], torch.as_tensor(expected)), direction
        assert torch.equal(runs[number], torch.as_tensor(loop_runs(grey.numpy(), 4, direction)))


def test_per_slice_matrices_add_up_to_the_in_plane_volume_matrices(rng):
    grey = random_grey(rng, (6, 8, 9))
    in_plane = unique_directions(True)
    per_slice = run_length_counts(grey, 4, in_plane, by_slice=True)
    assert torch.equal(per_slice.sum(0), run_length_counts(grey, 4, in_plane, by_slice=False))
    for z in range(grey.shape[0]):
        alone = run_length_counts(grey[z : z + 1], 4, in_plane, by_slice=False)
        assert torch.equal(per_slice[z, ..., : alone.shape[-1]], alone)


def test_zones_and_border_distances_match_scipy(rng):
    from scipy import ndimage

    grey = random_grey(rng, (6, 9, 8), levels=3)
    inside = grey > 0
    zones = find_zones(grey, border_distance(inside, in_plane=False), in_plane=False)
    expected_sizes = []
    for level in (1, 2, 3):
        labels, count = ndimage.label(grey.numpy() == level, structure=np.ones((3, 3, 3)))
        expected_sizes += np.bincount(labels.ravel())[1:].tolist()
    assert sorted(zones.sizes.tolist()) == sorted(expected_sizes)
    taxicab = ndimage.distance_transform_cdt(np.pad(inside.numpy(), 1), metric="taxicab")
    distance = border_distance(inside, in_plane=False)
    assert np.array_equal(distance.numpy(), taxicab[1:-1, 1:-1, 1:-1])


def test_neighbourhood_tone_differences_match_a_loop(rng):
    grey = random_grey(rng, (4, 6, 5), levels=3)
    s, n = tone_differences(grey, 3, 1, ("3D",))["3D"]
    expected_s, expected_n = np.zeros(3), np.zeros(3)
    g = np.pad(grey.numpy(), 1)
    for z, y, x in itertools.product(*(range(1, k + 1) for k in grey.shape)):
        if g[z, y, x] == 0:
            continue
        block = g[z - 1 : z + 2, y - 1 : y + 2, x - 1 : x + 2].astype(float)
        block[1, 1, 1] = 0
        if (block > 0).sum():
            expected_s[g[z, y, x] - 1] += abs(g[z, y, x] - block.sum() / (block > 0).sum())
            expected_n[g[z, y, x] - 1] += 1
    assert np.allclose(s.sum(0).numpy(), expected_s)
    assert np.allclose(n.sum(0).numpy(), expected_n)


def test_fixed_bin_size_discretisation_counts_bins_from_the_lower_bound():
    array = np.arange(-20, 80, dtype=np.float32).reshape(4, 5, 5)
    image, mask = make_image(array), make_image(np.ones(array.shape, np.uint8))
    settings = FeatureSettings(
        families=("ih",), discretisation_method="fixed_bin_size",
        discretisation_bin_width=25.0, discretisation_lower_bound=-50.0,
    )  # fmt: skip
    values = extract_features({"x": image}, mask, settings, device="cpu")
    # bins of 25 from -50: -20..-1 -> 2, 0..24 -> 3, 25..49 -> 4, 50..74 -> 5, 75..79 -> 6
    assert values["x_ih_min"] == 2 and values["x_ih_max"] == 6
    assert values["x_ih_mean"] == pytest.approx((2 * 20 + 3 * 25 + 4 * 25 + 5 * 25 + 6 * 5) / 100)


def test_image_geometry_does_not_change_texture_or_intensity_features(rng):
    array = rng.integers(0, 60, (8, 9, 10)).astype(np.float32)
    mask_array = ball(3.6, 10)[1:9, :9, :]
    plain = extract_features(
        {"a": make_image(array)}, make_image(mask_array), {"families": ["stat", "cm", "szm"]}
    )
    direction = sitk.VersorTransform((0.3, -0.2, 0.5), 0.7).GetMatrix()
    moved = extract_features(
        {"a": make_image(array, origin=(5, -3, 40), direction=direction)},
        make_image(mask_array, origin=(5, -3, 40), direction=direction),
        {"families": ["stat", "cm", "szm"]},
    )
    assert moved.keys() == plain.keys()
    assert all(moved[k] == pytest.approx(plain[k], nan_ok=True) for k in plain)
