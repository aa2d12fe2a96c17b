"""Known transforms for checking a registration: random rigid/affine/smooth perturbations,
applying them to an image, and mapping points through their inverse.

A perturbation ``P`` is applied as ``M'(y) = M(P(y))``: the perturbed image ``M'`` shows at
``y`` what the original showed at ``P(y)``. So if ``T`` took fixed points to ``M``'s space,
the true fixed -> ``M'`` transform is ``P^-1 o T``; with ``T`` the identity (images already
aligned), the registration of ``M'`` should find ``P^-1``. Used by the tests, the demo and
``benchmarks/registration.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.images import as_float32, value_range
from MultiModalAnalysisLib.registration.transforms import (  # noqa: F401  (compose re-exported)
    compose,
    matrix_offset,
)


def random_rigid(
    rng: np.random.Generator,
    max_rotation_deg: float = 10.0,
    max_translation_mm: float = 15.0,
    centre: Sequence[float] = (0.0, 0.0, 0.0),
) -> sitk.Euler3DTransform:
    """A rigid transform with each Euler angle and each shift drawn uniformly in +-max."""
    transform = sitk.Euler3DTransform()
    transform.SetCenter([float(c) for c in centre])
    angles = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
    transform.SetRotation(*(math.radians(a) for a in angles))
    transform.SetTranslation(rng.uniform(-max_translation_mm, max_translation_mm, 3).tolist())
    return transform


def random_affine(
    rng: np.random.Generator,
    max_rotation_deg: float = 10.0,
    max_translation_mm: float = 15.0,
    max_scale: float = 0.08,
    max_shear: float = 0.04,
    centre: Sequence[float] = (0.0, 0.0, 0.0),
) -> sitk.AffineTransform:
    """A random rigid transform composed with a scaling (+-max_scale per axis) and shear."""
    rigid = random_rigid(rng, max_rotation_deg, max_translation_mm, centre)
    scale = np.diag(1.0 + rng.uniform(-max_scale, max_scale, 3))
    shear = np.eye(3)
    upper = np.triu_indices(3, 1)
    shear[upper] = rng.uniform(-max_shear, max_shear, 3)
    matrix = np.array(rigid.GetMatrix()).reshape(3, 3) @ shear @ scale
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation(rigid.GetTranslation())
    return affine


def random_smooth_displacement(
    rng: np.random.Generator,
    reference: sitk.Image,
    max_displacement_mm: float = 6.0,
    smoothness_mm: float = 25.0,
    grid_spacing_mm: float = 4.0,
) -> sitk.DisplacementFieldTransform:
    """A smooth random displacement field over ``reference``'s extent, peak ``max`` mm.

    Each component is white noise smoothed by a Gaussian of ``smoothness_mm`` and scaled so
    that the largest displacement length is ``max_displacement_mm``. The field lives on an
    isotropic grid (``grid_spacing_mm``) with ``reference``'s orientation, 20 mm larger on
    every side so points near the border are displaced too.
    """
    grid = padded_grid(reference, grid_spacing_mm, margin_mm=20.0)
    size = grid.GetSize()[::-1]
    sigma = smoothness_mm / grid_spacing_mm
    from scipy.ndimage import gaussian_filter

    field = np.stack(
        [gaussian_filter(rng.standard_normal(size), sigma, mode="reflect") for _ in range(3)],
        axis=-1,
    )
    field *= max_displacement_mm / np.linalg.norm(field, axis=-1).max()
    image = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    image.CopyInformation(grid)
    return sitk.DisplacementFieldTransform(image)


def padded_grid(reference: sitk.Image, spacing_mm: float, margin_mm: float = 0.0) -> sitk.Image:
    """An empty isotropic grid with ``reference``'s orientation covering it plus a margin."""
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    extent = np.array(reference.GetSize()) * np.array(reference.GetSpacing()) + 2 * margin_mm
    size = np.maximum(np.ceil(extent / spacing_mm).astype(int), 2)
    corner = np.array(reference.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
    origin = corner + direction @ (np.full(3, spacing_mm / 2 - margin_mm))
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing([float(spacing_mm)] * 3)
    grid.SetOrigin(origin.tolist())
    grid.SetDirection(reference.GetDirection())
    return grid


def perturb_image(
    image: sitk.Image, perturbation: sitk.Transform, *, is_label: bool = False
) -> sitk.Image:
    """``M'(y) = M(P(y))`` on ``image``'s own grid (linear, or nearest for labels).

    Content moved out of the grid is lost, as when a scan is taken in another position.
    """
    if is_label:
        return sitk.Resample(image, image, perturbation, sitk.sitkNearestNeighbor, 0,
                             image.GetPixelID())
    return sitk.Resample(as_float32(image), image, perturbation, sitk.sitkLinear,
                         value_range(image)[0], sitk.sitkFloat32)


def move_image_rigidly(image: sitk.Image, rigid: sitk.Transform) -> sitk.Image:
    """``M'(y) = M(P(y))`` for a rigid ``P`` by changing the image's geometry: no resampling.

    Returns a copy whose origin and direction are mapped by ``P^-1``; voxel values are
    unchanged, so the true fixed -> ``M'`` transform is exactly ``P^-1``.
    """
    inverse = rigid.GetInverse()
    matrix, _ = matrix_offset(inverse)
    if not np.allclose(matrix @ matrix.T, np.eye(3), atol=1e-6):
        raise ValueError("move_image_rigidly needs a rigid transform (rotation + shift).")
    moved = sitk.Image(image)
    moved.SetOrigin(inverse.TransformPoint(image.GetOrigin()))
    direction = matrix @ np.array(image.GetDirection()).reshape(3, 3)
    moved.SetDirection(direction.ravel().tolist())
    return moved


def inverse_map_points(
    transform: sitk.Transform, points: Sequence[Sequence[float]], *, iterations: int = 50
) -> np.ndarray:
    """Points ``y`` with ``transform(y) = x`` for each ``x`` in ``points`` (N x 3).

    Exact for linear transforms; Newton iterations with a finite-difference Jacobian for
    others (displacement fields, composites), which converge for smooth, invertible ones.
    """
    targets = np.asarray(points, dtype=float)
    try:
        inverse = transform.GetInverse()
        if not _has_field(transform):
            return np.array([inverse.TransformPoint(tuple(p)) for p in targets])
    except RuntimeError:
        pass
    solved = []
    step = 0.1
    for x in targets:
        y = x.copy()
        for _ in range(iterations):
            residual = np.array(transform.TransformPoint(tuple(y))) - x
            if np.linalg.norm(residual) < 1e-4:
                break
            jacobian = np.empty((3, 3))
            for axis in range(3):
                offset = np.zeros(3)
                offset[axis] = step
                jacobian[:, axis] = (
                    np.array(transform.TransformPoint(tuple(y + offset)))
                    - np.array(transform.TransformPoint(tuple(y - offset)))
                ) / (2 * step)
            y = y - np.linalg.solve(jacobian, residual)
        solved.append(y)
    return np.array(solved)


def _has_field(transform: sitk.Transform) -> bool:
    if transform.GetTransformEnum() == sitk.sitkComposite:
        composite = sitk.CompositeTransform(transform)
        return any(
            _has_field(composite.GetNthTransform(i))
            for i in range(composite.GetNumberOfTransforms())
        )
    return not transform.IsLinear()
