"""Synthetic test volumes with known geometry and content (imported by the tests)."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk


def rotation_direction(angles_deg: tuple[float, float, float]) -> tuple[float, ...]:
    """A direction matrix (row-major 3x3) rotated by Euler angles about x, y, z."""
    transform = sitk.Euler3DTransform()
    transform.SetRotation(*(math.radians(a) for a in angles_deg))
    return tuple(transform.GetMatrix())


def make_image(
    array_zyx: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    direction: tuple[float, ...] | None = None,
) -> sitk.Image:
    """A SimpleITK image from a [z, y, x] array with the given geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def physical_points(image: sitk.Image) -> np.ndarray:
    """Physical coordinates of every voxel centre, shape [z, y, x, 3]."""
    size = image.GetSize()
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    index = np.stack([i, j, k], axis=-1).astype(float)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    scaled = index * np.array(image.GetSpacing())
    return np.array(image.GetOrigin()) + scaled @ direction.T


def linear_field_image(
    size: tuple[int, int, int],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    direction: tuple[float, ...],
    coefficients: tuple[float, float, float] = (0.7, -1.3, 2.1),
    offset: float = 100.0,
) -> sitk.Image:
    """An image whose value at each voxel is a linear function of its physical position.

    Linear interpolation reproduces such a field exactly, so any resampling error shows up
    as a value mismatch at a known physical point.
    """
    reference = make_image(np.zeros(size[::-1], np.float32), spacing, origin, direction)
    points = physical_points(reference)
    values = points @ np.array(coefficients) + offset
    return make_image(values.astype(np.float32), spacing, origin, direction)


def centred_grid(
    source: sitk.Image,
    size: tuple[int, int, int],
    spacing: tuple[float, float, float],
    direction: tuple[float, ...],
) -> sitk.Image:
    """An empty float32 grid with the given geometry, centred on ``source``'s centre."""
    centre_source = np.array(
        source.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in source.GetSize()])
    )
    grid = make_image(np.zeros(size[::-1], np.float32), spacing, (0.0, 0.0, 0.0), direction)
    centre_grid = np.array(
        grid.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in size])
    )
    grid.SetOrigin((centre_source - centre_grid).tolist())
    return grid
