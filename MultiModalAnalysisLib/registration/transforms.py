"""Small helpers on SimpleITK transforms: composition, matrix form, displacement fields."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def compose(*transforms: sitk.Transform | None) -> sitk.Transform:
    """``compose(A, B)(x) = A(B(x))``: the last transform is applied first (ITK order).

    ``None`` entries are skipped; a single transform is returned as is. Composites among
    the inputs are flattened into one list (ITK cannot write a composite nested in another
    to a file).
    """
    present = [t for t in transforms if t is not None]
    if not present:
        return sitk.Transform(3, sitk.sitkIdentity)
    if len(present) == 1:
        return present[0]
    composite = sitk.CompositeTransform(3)
    for transform in present:
        if transform.GetTransformEnum() == sitk.sitkComposite:
            nested = sitk.CompositeTransform(transform)
            for i in range(nested.GetNumberOfTransforms()):
                composite.AddTransform(nested.GetNthTransform(i))
        else:
            composite.AddTransform(transform)
    return composite


def matrix_offset(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """Matrix ``A`` and offset ``b`` with ``transform(x) = A x + b`` (a linear transform)."""
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    matrix = np.column_stack([
        np.array(transform.TransformPoint(tuple(np.eye(3)[i]))) - origin for i in range(3)
    ])
    return matrix, origin


def as_single_linear(transform: sitk.Transform, centre=None) -> sitk.Transform:
    """A linear transform (or composite of linear ones) as one ``Euler3DTransform`` when it is
    a rotation plus shift, else one ``AffineTransform`` (centre of rotation ``centre``)."""
    matrix, offset = matrix_offset(transform)
    centre = np.zeros(3) if centre is None else np.asarray(centre, dtype=float)
    rigid = np.allclose(matrix @ matrix.T, np.eye(3), atol=1e-6) and np.linalg.det(matrix) > 0
    result = sitk.Euler3DTransform() if rigid else sitk.AffineTransform(3)
    result.SetCenter(centre.tolist())
    result.SetMatrix(matrix.ravel().tolist())
    # x -> A x + b  ==  A (x - c) + c + t  =>  t = b - c + A c
    result.SetTranslation((offset - centre + matrix @ centre).tolist())
    return result


def compose_linear(outer: sitk.Transform, inner: sitk.Transform) -> sitk.Transform:
    """``outer o inner`` as one linear transform when both are linear, else a composite."""
    if not (outer.IsLinear() and inner.IsLinear()):
        return compose(outer, inner)
    params = inner.GetFixedParameters()
    centre = np.array(params[:3]) if len(params) >= 3 else None
    return as_single_linear(compose(outer, inner), centre)


def displacement_field_transform(field_zyx3: np.ndarray, grid: sitk.Image,
                                 ) -> sitk.DisplacementFieldTransform:
    """A displacement-field transform from an array ``[z, y, x, 3]`` of physical (x, y, z)
    displacements in mm on ``grid``'s voxels (linear interpolation between them).

    The field is stored with one more voxel on every side, a copy of the edge: ITK gives a
    point beyond the grid's outer faces a zero displacement, so a point just past the fixed
    image (a slightly larger evaluation grid, an image with another extent) would see the
    transform jump back to the identity there, a tear that also shows up as folding.
    """
    padded = np.pad(np.asarray(field_zyx3, dtype=np.float64), [(1, 1)] * 3 + [(0, 0)],
                    mode="edge")
    image = sitk.GetImageFromArray(np.ascontiguousarray(padded), isVector=True)
    image.SetSpacing(grid.GetSpacing())
    image.SetDirection(grid.GetDirection())
    image.SetOrigin(grid.TransformIndexToPhysicalPoint([-1, -1, -1]))
    return sitk.DisplacementFieldTransform(image)


def field_of(transform: sitk.Transform) -> sitk.DisplacementFieldTransform | None:
    """The displacement-field part of a transform (itself or inside a composite), if any."""
    if transform.GetTransformEnum() == sitk.sitkDisplacementField:
        return sitk.DisplacementFieldTransform(transform)
    if transform.GetTransformEnum() == sitk.sitkComposite:
        composite = sitk.CompositeTransform(transform)
        for i in range(composite.GetNumberOfTransforms()):
            found = field_of(composite.GetNthTransform(i))
            if found is not None:
                return found
    return None
