"""Deformable registration with a SimpleITK B-spline free-form deformation on top of a linear
transform: ``T(x) = linear(B(x))``, optimised by gradient descent on two image levels."""

from __future__ import annotations

import contextlib
import io
import threading
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.progress import Progress, check_cancel
from MultiModalAnalysisLib.registration.prepare import (
    MIN_VOXELS_PER_AXIS,
    downsample,
    level_spacing,
    thin_capped,
)
from MultiModalAnalysisLib.registration.similarity import set_sitk_metric


@dataclass(frozen=True)
class BSplineSettings:
    """How the B-spline backend runs.

    Attributes:
        image_spacing_mm: the (isotropic) grid the fixed image is resampled to.
        control_spacing_mm: control-point spacing (the smoothness of the deformation).
        iterations: gradient-descent (line search) iterations per level (two levels: image
            shrink 2, then 1; the control grid stays the same).
        samples: random metric samples per level.
        seed: sampling seed.
    """

    image_spacing_mm: float = 3.0
    control_spacing_mm: float = 30.0
    iterations: int = 40
    samples: int = 20000
    seed: int = 20240611


class _Cancelled(Exception):
    pass


def register_deformable_bspline(
    fixed: sitk.Image,
    moving: sitk.Image,
    linear: sitk.Transform,
    metric: str,
    *,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    settings: BSplineSettings | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> sitk.BSplineTransform:
    """Optimise a B-spline deformation ``B`` with ``T(x) = linear(B(x))``.

    Args:
        fixed, moving: float32 registration images.
        linear: the fixed -> moving linear transform found before.
        metric: "mi", "ncc" or "lncc" (SimpleITK metrics; "mind" falls back to MI).
        fixed_mask, moving_mask: where the metric is evaluated / where the moving is valid.
        settings: see :class:`BSplineSettings`.

    Returns:
        The B-spline transform; compose it as ``compose(linear, bspline)``.
    """
    settings = settings or BSplineSettings()
    report = progress or Progress()
    grid = downsample(fixed, thin_capped(fixed, [settings.image_spacing_mm] * 3))
    source = downsample(moving, thin_capped(moving, level_spacing(
        moving, settings.image_spacing_mm)))
    extent = np.array(grid.GetSize()) * np.array(grid.GetSpacing())
    mesh = [max(1, int(round(e / settings.control_spacing_mm))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(grid, mesh, order=3)

    method = sitk.ImageRegistrationMethod()
    set_sitk_metric(method, metric)
    voxels = int(np.prod(grid.GetSize()))
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(min(1.0, settings.samples / voxels), settings.seed)
    method.SetInterpolator(sitk.sitkLinear)
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        method.SetMetricMovingMask(moving_mask)
    method.SetMovingInitialTransform(linear)
    method.SetInitialTransform(bspline, inPlace=True)
    levels = 2 if min(grid.GetSize()) >= 2 * MIN_VOXELS_PER_AXIS else 1
    if levels == 2:
        method.SetShrinkFactorsPerLevel([2, 1])
        method.SetSmoothingSigmasPerLevel([settings.image_spacing_mm, 0.0])
    else:  # a thin slab: ITK's pyramid would halve it below what its smoothing accepts
        method.SetShrinkFactorsPerLevel([1])
        method.SetSmoothingSigmasPerLevel([0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    # Steps capped at a fraction of a voxel: unregularised B-splines fold easily where the
    # metric is flat (PET away from the lesion), and small steps keep them smooth.
    method.SetOptimizerAsGradientDescentLineSearch(
        1.0, settings.iterations, convergenceMinimumValue=1e-6, convergenceWindowSize=5,
        lineSearchUpperLimit=2.0, maximumStepSizeInPhysicalUnits=settings.image_spacing_mm / 4)
    # Unit scales: every parameter is a control point's displacement in mm. (ITK's physical-shift
    # estimate of them probes each of the thousands of parameters: 87 of the 99 s that 5
    # iterations took on a 97 x 99 x 59 CT.)
    count = [0]

    def on_iteration() -> None:
        count[0] += 1
        report(min(0.99, count[0] / (levels * settings.iterations)), "B-spline deformation")
        if cancel is not None and cancel.is_set():
            raise _Cancelled()

    method.AddCommand(sitk.sitkIterationEvent, on_iteration)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            method.Execute(grid, source)
    except RuntimeError:
        check_cancel(cancel, "the deformable registration")
        raise
    finally:
        method.RemoveAllCommands()
    report(1.0, "B-spline deformation done")
    return bspline
