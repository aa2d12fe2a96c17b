"""Deformable registration (torch and B-spline backends): recovery of a known smooth
deformation across modalities, no folding, the .h5 round trip, and the Jacobian report."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from registration_phantoms import inner_points, phantom, registration_error

from MultiModalAnalysisLib.metrics import (
    folding_statistics,
    jacobian_determinant,
    jacobian_of_displacement,
)
from MultiModalAnalysisLib.progress import Progress
from MultiModalAnalysisLib.registration import register
from MultiModalAnalysisLib.registration.deformable_bspline import BSplineSettings
from MultiModalAnalysisLib.registration.deformable_torch import (
    TorchDeformableSettings,
    bending_energy,
    diffusion_energy,
)
from MultiModalAnalysisLib.registration.perturb import inverse_map_points
from MultiModalAnalysisLib.registration.transforms import displacement_field_transform

# Small volumes, few iterations: the tests check that each backend works, not its limits.
FAST_TORCH = TorchDeformableSettings(spacings_mm=(6.0, 3.0), iterations=(60, 40),
                                     samples=8000)
FAST_BSPLINE = BSplineSettings(image_spacing_mm=3.0, control_spacing_mm=24.0, iterations=30)


def bump_field(reference: sitk.Image, amplitude_mm: float = 5.0) -> sitk.Transform:
    """A smooth, invertible displacement: a Gaussian bump pushing tissue along x and y."""
    grid = sitk.Image([40, 40, 40], sitk.sitkUInt8)
    grid.SetSpacing([3.0] * 3)
    grid.SetOrigin([-58.5] * 3)
    k, j, i = np.meshgrid(*(np.arange(40) * 3.0 - 58.5,) * 3, indexing="ij")
    weight = np.exp(-((i - 8) ** 2 + (j + 4) ** 2 + k ** 2) / (2 * 18.0 ** 2))
    field = np.zeros((40, 40, 40, 3))
    field[..., 0] = amplitude_mm * weight
    field[..., 1] = -0.6 * amplitude_mm * weight
    return displacement_field_transform(field, grid)


@pytest.fixture(scope="module")
def deformed_pair():
    fixed = phantom("CT")
    perturbation = bump_field(fixed)
    moving = phantom("MR", transform=perturbation, seed=11)
    points = inner_points(5)
    truth = inverse_map_points(perturbation, points)
    return fixed, moving, points, truth


@pytest.mark.parametrize("backend,settings", [("torch", FAST_TORCH), ("bspline", FAST_BSPLINE)])
def test_deformable_registration_recovers_a_smooth_deformation_ct_mr(
        deformed_pair, backend, settings):
    fixed, moving, points, truth = deformed_pair
    moved = np.linalg.norm(points - truth, axis=1)
    bumped = moved > 2.0  # the points the deformation moves noticeably
    affine = register(fixed, moving, "affine", fixed_modality="CT", moving_modality="MR")
    options = {"torch_settings": settings} if backend == "torch" else {
        "bspline_settings": settings}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = register(fixed, moving, "deformable", backend=backend, device="cpu",
                          fixed_modality="CT", moving_modality="MR", **options)

    # e.g. torch's "non-tuple sequence for multidimensional indexing" from MONAI's losses;
    # not SimpleITK's own use of numpy (numpy 2.5 deprecates the array-shape setter that
    # SimpleITK 2.5's GetArrayViewFromImage uses), which no caller can change
    assert not [w for w in caught if (issubclass(w.category, (DeprecationWarning,
                                                              FutureWarning))
                                      or "deprecated" in str(w.message))
                and "SimpleITK" not in w.filename]
    affine_error = registration_error(affine.transform, truth, points)[bumped]
    deformable_error = registration_error(result.transform, truth, points)[bumped]
    assert np.median(deformable_error) < 0.7 * np.median(affine_error)
    assert np.median(deformable_error) < 1.5
    assert result.metrics["backend"] == backend
    assert result.metrics["folding_percent"] < 0.1
    assert 0.0 < result.metrics["jacobian_min"] <= 1.0 <= result.metrics["jacobian_max"]
    assert result.metrics["metric_after"] < result.metrics["metric_before"]



def test_same_modality_deformable_registration_uses_dense_lncc_and_recovers(deformed_pair):
    """CT to CT: ``auto`` picks the dense local NCC path (the whole moving image warped at
    every iteration), which must recover the bump as the sampled cross-modal path does."""
    fixed, _, points, truth = deformed_pair
    moving = phantom("CT", transform=bump_field(fixed), seed=11)
    moved = np.linalg.norm(points - truth, axis=1) > 2.0
    result = register(fixed, moving, "deformable", backend="torch", device="cpu",
                      fixed_modality="CT", moving_modality="CT", torch_settings=FAST_TORCH)
    error = registration_error(result.transform, truth, points)[moved]
    before = np.linalg.norm(points - truth, axis=1)[moved]
    assert result.metrics["deformable_metric"] == "lncc"
    assert np.median(error) < 1.5 and np.median(error) < 0.4 * np.median(before)
    assert result.metrics["folding_percent"] < 0.1

def test_deformable_result_round_trips_through_an_h5_file(deformed_pair, tmp_path):
    fixed, moving, points, _ = deformed_pair
    settings = TorchDeformableSettings(spacings_mm=(6.0,), iterations=(20,), samples=4000)
    result = register(fixed, moving, "deformable", backend="torch", device="cpu",
                      torch_settings=settings)

    paths = result.save(tmp_path, qc=False)

    assert paths["transform"].name == "transform.h5"
    read = sitk.ReadTransform(str(paths["transform"]))
    assert np.allclose([read.TransformPoint(tuple(p)) for p in points],
                       [result.transform.TransformPoint(tuple(p)) for p in points], atol=1e-3)


def test_regularisers_give_the_energies_of_analytic_fields_and_match_monai():
    """Bending and diffusion energy in voxel units, averaged over the inner voxels and the
    three components: u_x = x^2 bends by 2 (energy 4 / 3), u_x = x y has a mixed derivative
    of 1 counted twice (2 / 3), u_x = 3 x diffuses by 3^2 (3); a translation costs nothing."""
    import monai.losses.deform as monai_deform
    import torch

    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (6, 7, 8)),
                             indexing="ij")

    def field(component_x):
        u = torch.zeros((1, 3, 6, 7, 8), dtype=torch.float64)
        u[0, 2] = component_x  # channels follow the spatial axes (z, y, x)
        return u

    assert float(bending_energy(field(x ** 2))) == pytest.approx(4 / 3)
    assert float(bending_energy(field(x * y))) == pytest.approx(2 / 3)
    assert float(bending_energy(field(3 * x))) == pytest.approx(0.0, abs=1e-12)
    assert float(diffusion_energy(field(3 * x))) == pytest.approx(3.0)
    assert float(diffusion_energy(field(x * 0 + 5.0))) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="> 2"):
        bending_energy(torch.zeros((1, 3, 2, 7, 8)))

    random = torch.randn((1, 3, 7, 9, 11), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's list indexing, which ours avoids
        assert torch.equal(diffusion_energy(random), monai_deform.DiffusionLoss()(random))
        if hasattr(monai_deform, "spatial_gradient_squared"):  # MONAI >= 1.6.1: compact stencil
            torch.testing.assert_close(bending_energy(random),  # fewer operations
                                       monai_deform.BendingEnergyLoss()(random),
                                       rtol=1e-6, atol=0.0)
    for shape in ((1, 1, 9), (1, 2, 6, 5)):  # 1-D and 2-D fields: the same stencils
        smaller = torch.randn(shape, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(bending_energy(smaller),
                                       monai_deform.BendingEnergyLoss()(smaller))


def test_jacobian_of_an_analytic_sine_field_and_its_folding_fraction():
    # u_x(x) = A sin(k x): det(I + du/dx) = 1 + A k cos(k x), folded where cos(k x) < -1/(A k).
    size, spacing = 64, 1.0
    grid = sitk.Image([size, 8, 6], sitk.sitkUInt8)
    grid.SetSpacing([spacing, 2.0, 3.0])
    x = np.arange(size) * spacing
    wavelength = 32.0
    k = 2 * math.pi / wavelength
    for amplitude, expected_fraction in ((0.5 / k, 0.0), (2.0 / k, 1.0 / 3.0)):
        field = np.zeros((6, 8, size, 3))
        field[..., 0] = amplitude * np.sin(k * x)[None, None, :]
        transform = displacement_field_transform(field, grid)
        # the stored field carries one edge-copy voxel on every side
        array = sitk.GetArrayFromImage(transform.GetDisplacementField())[1:-1, 1:-1, 1:-1]
        jacobian = jacobian_of_displacement(array, grid)
        inner = sitk.GetArrayFromImage(jacobian)[:, :, 2:-2]
        expected = 1 + amplitude * k * np.cos(k * x)[2:-2]
        assert np.allclose(inner[0, 0], expected, atol=0.02)
        stats = folding_statistics(jacobian)
        assert stats["folding_percent"] == pytest.approx(100 * expected_fraction, abs=4.0)


def test_a_displacement_field_has_no_tear_just_past_the_edge_of_its_grid():
    """ITK gives points beyond a field's outer faces a zero displacement; the stored field is
    padded with an edge copy so a grid slightly larger than the fixed image (like the
    benchmark's 2 mm evaluation grid) sees no jump back to the identity."""
    grid = sitk.Image([10, 12, 8], sitk.sitkUInt8)
    grid.SetSpacing([3.0, 3.0, 4.0])
    grid.SetOrigin([5.0, -7.0, 2.0])
    field = np.zeros((8, 12, 10, 3))
    field[..., 0] = 2.5  # 2.5 mm along x everywhere
    transform = displacement_field_transform(field, grid)
    for index in ([-0.9] * 3, [9.9, 11.9, 7.9], [4.0, 5.0, 3.0]):
        point = np.array(grid.TransformContinuousIndexToPhysicalPoint(index))
        moved = np.array(transform.TransformPoint(point.tolist()))
        assert np.allclose(moved - point, [2.5, 0.0, 0.0], atol=1e-6)
    larger = sitk.Image([12, 14, 10], sitk.sitkUInt8)  # one voxel past every face
    larger.SetSpacing(grid.GetSpacing())
    larger.SetOrigin(grid.TransformContinuousIndexToPhysicalPoint([-0.9] * 3))
    jacobian = sitk.GetArrayFromImage(jacobian_determinant(transform, larger))
    assert np.allclose(jacobian, 1.0, atol=1e-6)


def test_torch_stage_runs_on_one_cpu_thread_and_restores_the_setting(deformed_pair):
    """On the CPU the optimisation runs on one intra-op thread (more cost CPU time and gain
    no wall time at these sizes: docs/benchmarks.md); the process setting comes back."""
    import torch

    from MultiModalAnalysisLib.registration.deformable_torch import register_deformable_torch

    fixed, moving, _, _ = deformed_pair
    seen = []

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        settings = TorchDeformableSettings(spacings_mm=(6.0,), iterations=(3,), samples=500)
        register_deformable_torch(fixed, moving, sitk.Euler3DTransform(), "mi",
                                  settings=settings, device=torch.device("cpu"),
                                  progress=Progress(lambda f, m: seen.append(
                                      torch.get_num_threads())))
        # every iteration on one thread; the closing "done" report comes after the stage
        assert len(seen) == 4 and seen[:3] == [1, 1, 1]
        assert seen[3] == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_scaling_and_squaring_matches_monai_dvf2ddf_and_builds_its_grid_once(monkeypatch):
    """The integrator is MONAI's DVF2DDF computation with the sampling grid made once (MONAI
    1.6.1's Warp rebuilt it on the host at every squaring step)."""
    import torch
    from monai.networks.blocks import DVF2DDF

    from MultiModalAnalysisLib.registration.deformable_torch import ScalingAndSquaring

    generator = torch.Generator().manual_seed(0)
    coarse = torch.randn((1, 3, 4, 5, 3), generator=generator) * 3.0
    velocity = torch.nn.functional.interpolate(coarse, size=(9, 12, 7), mode="trilinear",
                                               align_corners=True)  # smooth, up to ~6 voxels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = DVF2DDF(num_steps=6, mode="bilinear", padding_mode="border")(velocity)
    integrate = ScalingAndSquaring(velocity.shape[2:], 6, "cpu")
    made = []
    real_stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **k: made.append(1) or real_stack(*a, **k))
    found = integrate(velocity)
    assert not made  # nothing rebuilt per call
    assert float(expected.abs().max()) > 2.0
    torch.testing.assert_close(found, expected, atol=1e-4, rtol=1e-4)


def test_voxel_warp_matches_monai_warp_with_zero_padding_and_builds_its_grid_once(monkeypatch):
    """The dense "lncc" path's warp is MONAI's Warp (bilinear, zeros outside) with the
    identity grid made once."""
    import torch
    from monai.networks.blocks import Warp

    from MultiModalAnalysisLib.registration.deformable_torch import VoxelWarp

    generator = torch.Generator().manual_seed(1)
    volume = torch.rand((1, 1, 9, 12, 7), generator=generator)
    displacement = torch.nn.functional.interpolate(
        torch.randn((1, 3, 3, 4, 3), generator=generator) * 2.5, size=(9, 12, 7),
        mode="trilinear", align_corners=True)  # some points leave the volume: zeros there
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = Warp(mode="bilinear", padding_mode="zeros")(volume, displacement)
    warp = VoxelWarp(volume.shape[2:], "cpu", "zeros")
    made = []
    real_stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **k: made.append(1) or real_stack(*a, **k))
    found = warp(volume, displacement)
    assert not made
    assert float((expected - volume).abs().max()) > 0.3  # the warp moved something
    assert int((expected == 0).sum()) > 0  # and padded with zeros somewhere
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-5)


def test_level_image_is_a_gaussian_then_linear_resampling_onto_the_spacing_grid():
    """The torch stage's levels: per axis, the anti-aliasing Gaussian (sigma half the new
    spacing where it is coarser, edges repeated) and linear interpolation onto
    ``spacing_grid``, as small matrix products; equal to doing the two steps one after the
    other with scipy and ITK, on an oblique, anisotropic grid, and close to the ITK level
    (``downsample``) that it replaces."""
    from scipy.ndimage import gaussian_filter

    from MultiModalAnalysisLib.preprocess.resample import antialias_sigmas, spacing_grid
    from MultiModalAnalysisLib.registration.deformable_torch import level_image
    from MultiModalAnalysisLib.registration.prepare import downsample

    rng = np.random.default_rng(3)
    array = gaussian_filter(rng.normal(size=(37, 61, 70)), 1.5).astype(np.float32) * 100
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([0.8, 1.1, 2.5])
    image.SetOrigin([-20.0, 5.0, 12.0])
    angle = 0.3
    image.SetDirection([math.cos(angle), -math.sin(angle), 0, math.sin(angle),
                        math.cos(angle), 0, 0, 0, 1])
    for spacing in ([3.0, 3.0, 3.0], [6.0, 6.0, 6.0], [2.0, 1.1, 2.5]):
        level = level_image(image, spacing, "cpu")
        reference = spacing_grid(image, spacing)
        assert level.GetSize() == reference.GetSize()
        assert np.allclose(level.GetOrigin(), reference.GetOrigin())
        assert np.allclose(level.GetSpacing(), spacing)
        assert level.GetDirection() == image.GetDirection()
        sigmas = antialias_sigmas(image.GetSpacing(), spacing) / np.array(image.GetSpacing())
        smoothed = sitk.GetImageFromArray(
            gaussian_filter(array, sigmas[::-1], mode="nearest", truncate=4.0))
        smoothed.CopyInformation(image)
        expected = sitk.GetArrayFromImage(sitk.Resample(
            smoothed, reference, sitk.Transform(), sitk.sitkLinear,
            float(sitk.GetArrayFromImage(smoothed).min()), sitk.sitkFloat32))
        found = sitk.GetArrayFromImage(level)
        spread = float(np.ptp(expected))
        assert spread > 10
        assert np.abs(found - expected).max() < 1e-4 * spread, spacing
        itk_level = sitk.GetArrayFromImage(downsample(image, spacing))
        assert np.abs(found - itk_level).mean() < 0.01 * spread, spacing
    assert level_image(image, [0.805, 1.1, 2.5], "cpu") is image  # its own spacing
