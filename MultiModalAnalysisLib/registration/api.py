"""``register``: one call for rigid, affine and deformable registration, with quality checks."""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError, MMAWarning
from MultiModalAnalysisLib.metrics import folding_statistics, jacobian_of_displacement
from MultiModalAnalysisLib.progress import ProgressCallback, as_progress, check_cancel
from MultiModalAnalysisLib.registration.deformable_bspline import (
    BSplineSettings,
    register_deformable_bspline,
)
from MultiModalAnalysisLib.registration.deformable_torch import (
    TorchDeformableSettings,
    register_deformable_torch,
)
from MultiModalAnalysisLib.registration.landmarks import register_landmarks, validate_landmarks
from MultiModalAnalysisLib.registration.linear import (
    LinearSettings,
    evaluate_metric,
    register_linear,
)
from MultiModalAnalysisLib.registration.prepare import (
    build_pyramid,
    fill_mask,
    grow_mask,
    is_region,
    region_margin,
    registration_image,
    registration_mask,
    with_masks,
)
from MultiModalAnalysisLib.registration.result import RegistrationResult
from MultiModalAnalysisLib.registration.similarity import choose_metric, metric_label
from MultiModalAnalysisLib.registration.transforms import compose, matrix_offset

log = logging.getLogger(__name__)

TRANSFORM_TYPES = ("rigid", "affine", "deformable")
BACKENDS = ("auto", "torch", "bspline")


class RegistrationWarning(MMAWarning):
    """A registration finished but its result is doubtful (e.g. the metric got worse)."""


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: str = "rigid",
    metric: str = "auto",
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    initial_transform: sitk.Transform | None = None,
    device: str = "auto",
    backend: str = "auto",
    fixed_modality: str | None = None,
    moving_modality: str | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    *,
    landmarks: tuple[Sequence[Sequence[float]], Sequence[Sequence[float]]] | None = None,
    search: bool | None = None,
    ignore_fill: bool = True,
    mask_margin_mm: float | None = None,
    linear_settings: LinearSettings | None = None,
    torch_settings: TorchDeformableSettings | None = None,
    bspline_settings: BSplineSettings | None = None,
    threads: int | None = None,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed``.

    Args:
        fixed, moving: 3-D scalar volumes (never modified).
        transform: "rigid", "affine" or "deformable" (an affine stage, then a dense
            deformation).
        metric: "auto" (by modality pair: mutual information across modalities or when
            unknown, NCC within one, local NCC for a deformable stage within one), "mi",
            "ncc", "lncc", or "mind" (MIND-SSC; torch backend).
        fixed_mask: the region of the fixed image the metric looks at (e.g. the body or a
            box around the tumour); any grid.
        moving_mask: the region of the moving image that may be used.
        mask_margin_mm: how far around each mask the metric also looks (mm). By default
            10 mm for a mask that covers less than half its image (a lesion: its inside is
            often too uniform to align two modalities by), none for a larger one; 0 keeps
            every mask exactly as given.
        initial_transform: fixed -> moving transform to start from (e.g. from
            :func:`register_landmarks`); the search then looks for a correction around it.
        device: torch device for the torch backend ("auto", "cpu", "cuda").
        backend: deformable backend: "torch" (stationary velocity field, scaling and
            squaring), "bspline" (SimpleITK free-form deformation) or "auto" (torch).
        fixed_modality, moving_modality: modality names used by ``metric="auto"``.
        progress: ``progress(fraction, message)`` callback.
        cancel: stops the registration when set.
        landmarks: (fixed points, moving points), paired, LPS mm: reported as TRE, and used
            for the initial transform (rigid, >= 3 pairs) when none is given.
        search: run the coarse search for a starting pose (default: yes, unless an initial
            transform or landmarks are given, when a narrower search is run).
        ignore_fill: leave constant fill (corners outside a resampled scan's original field
            of view, the background of a skull-stripped brain) of either image out of the
            metric, where no mask is given for that image.
        linear_settings, torch_settings, bspline_settings: expert settings per stage.
        threads: CPU threads that score the rigid/affine candidate poses (default: the
            cores this process may use, at most two). The result does not depend on it;
            give 1 when running several registrations side by side.

    Returns:
        A :class:`RegistrationResult`: ``transform`` (fixed -> moving), ``warped`` (moving on
        the fixed grid), ``metrics`` and ``save(output_dir)``.

    Raises:
        ImageDimensionError: a 2-D/4-D or vector image.
        EmptyImageError: an empty mask.
        ConstantImageError: an image without contrast.
        GeometryError: the images do not overlap, even after initialisation.
        ConfigError: unknown transform type, metric, backend or device.
        OperationCancelled: ``cancel`` was set.
    """
    started = time.perf_counter()
    kind = _choice(transform, TRANSFORM_TYPES, "transform type")
    backend = _choice(backend, BACKENDS, "deformable backend")
    if mask_margin_mm is not None and (isinstance(mask_margin_mm, bool)
                                       or not isinstance(mask_margin_mm, (int, float))
                                       or not math.isfinite(mask_margin_mm)
                                       or mask_margin_mm < 0):
        raise ConfigError(f"mask_margin_mm must be a distance >= 0 in mm, not {mask_margin_mm!r}.")
    if initial_transform is not None and (not isinstance(initial_transform, sitk.Transform)
                                          or initial_transform.GetDimension() != 3):
        what = (f"{initial_transform.GetDimension()}-D"
                if isinstance(initial_transform, sitk.Transform)
                else type(initial_transform).__name__)
        raise ConfigError(f"the initial transform is {what}: a 3-D SimpleITK transform "
                          "(fixed point -> moving point) is needed.")
    if kind == "deformable" and backend == "bspline" and metric == "lncc":
        raise ConfigError(
            "local NCC is a metric of the torch backend only: ITK's (ANTS neighbourhood "
            "correlation) took 372 s for 5 B-spline iterations on a 97 x 99 x 59 CT. Use "
            "the torch backend (backend='torch', --backend torch), or NCC with the B-spline "
            "backend (metric='ncc', --metric ncc).")
    from MultiModalAnalysisLib.device import resolve_device

    resolved = resolve_device(device)  # an impossible request fails here, for every kind
    if kind != "deformable" and resolved.type == "cuda":
        log.info("rigid and affine registration run on the CPU (SimpleITK and a batched "
                 "search); the device applies to the deformable stage only.")
    report = as_progress(progress)
    check_cancel(cancel, "the registration")
    fixed_image = registration_image(fixed, "the fixed image")
    moving_image = registration_image(moving, "the moving image")
    fixed_region = registration_mask(fixed_mask, fixed_image, "the fixed mask")
    moving_region = registration_mask(moving_mask, moving_image, "the moving mask")
    # A region of interest (a lesion and its margin) is where the result must be right,
    # but too small a part of the images to find the pose in from a distant start: the
    # search for a start scores the whole images (less their fill), the polish, the final
    # refinement and the affine stage the region. With the region from the start, PET to
    # CT with the GTV as fixed mask ended 24-36 mm off on 4 of 13 STS patients.
    regions = (is_region(fixed_region), is_region(moving_region))
    margins = {name: region_margin(region, mask_margin_mm) for name, region in
               (("fixed", fixed_region), ("moving", moving_region)) if region is not None}
    fixed_region = grow_mask(fixed_region, margins["fixed"]) if "fixed" in margins else None
    moving_region = grow_mask(moving_region, margins["moving"]) if "moving" in margins else None
    # Constant fill (outside a resampled scan's field of view, or around a skull-stripped
    # brain) is not the patient in either image: with it left out of the fixed samples too,
    # a pair that both have it (two skull-stripped MRs) is scored where both show tissue;
    # with it left out of the moving image only, most fixed samples landed in the moving
    # fill and no pose overlapped enough to be scored.
    # The moving fill's edge is peeled off (smoothing mixes the fill into the tissue beside
    # it) only where the fixed image has no fill of its own: where both have it, that mixed
    # band lines up in both, and peeling it off the moving side alone dropped the fixed
    # samples at the brain's outline in the right pose, so a wrong one scored better.
    fixed_fill = moving_fill = None
    if fixed_region is None and ignore_fill:
        fixed_region = fixed_fill = fill_mask(fixed_image)
    if moving_region is None and ignore_fill:
        moving_region = moving_fill = fill_mask(moving_image)
    eroded_moving = 1 if moving_fill is not None and fixed_fill is None else 0
    concrete = choose_metric(metric, fixed_modality, moving_modality)
    settings = linear_settings or _levels_for(LinearSettings(), fixed_image, moving_image)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be a whole number >= 1, not {threads!r}.")
        settings = replace(settings, threads=threads)

    landmark_points = None
    start = "given" if initial_transform is not None else None  # for the advice in warnings
    if landmarks is not None:
        landmark_points = validate_landmarks(*landmarks)
        if initial_transform is None and len(landmark_points[0]) >= 3:
            start = "landmarks"
            initial_transform = register_landmarks(*landmark_points, transform="rigid")
    if search is None:
        search = True
    if initial_transform is not None and settings.search:
        # Trust a given start: search a narrower neighbourhood around it.
        settings = _narrow(settings)
    if not search:
        settings = _without_search(settings)

    levels = build_pyramid(fixed_image, moving_image, settings.spacings_mm, fixed_region,
                           moving_region, erode_moving=eroded_moving, regions=regions)
    search_levels = None
    if any(regions) and settings.search:
        # each region of interest replaced by the image's fill mask, as without a mask
        fixed_search, moving_search = fixed_region, moving_region
        if regions[0]:
            fixed_search = fixed_fill = fill_mask(fixed_image) if ignore_fill else None
        if regions[1]:
            moving_search = moving_fill = fill_mask(moving_image) if ignore_fill else None
        search_levels = with_masks(
            levels, fixed_search, moving_search,
            erode_moving=int(moving_fill is not None and fixed_fill is None))
    finest = levels[-1]
    sitk_metric = "mi" if concrete == "mind" else concrete
    if concrete == "mind" and kind != "deformable":
        log.warning("metric 'mind' is a deformable (torch) metric: the %s registration uses "
                    "Mattes MI instead.", kind)
    before = evaluate_metric(finest, sitk_metric, initial_transform or sitk.Transform())
    linear_kind = "rigid" if kind == "rigid" else "affine"
    linear_share = 1.0 if kind != "deformable" else 0.4
    result_transform = register_linear(
        levels, linear_kind, sitk_metric, initial_transform, settings, search_levels=search_levels,
        progress=report.sub(0.0, linear_share * 0.95), cancel=cancel)
    metrics: dict[str, Any] = {"transform_type": kind}
    if margins:
        metrics["mask_margin_mm"] = margins

    if kind == "deformable":
        deformable_metric = choose_metric(metric, fixed_modality, moving_modality,
                                          deformable=True)
        if backend == "bspline" and deformable_metric in ("lncc", "mind"):
            # "auto" within one modality: ITK's local NCC crawls; MIND is torch's alone
            deformable_metric = {"lncc": "ncc", "mind": "mi"}[deformable_metric]
        result_transform, extra = _deformable(
            fixed_image, moving_image, result_transform, deformable_metric, fixed_region,
            moving_region, backend, device, torch_settings, bspline_settings,
            report.sub(linear_share * 0.95, 0.95), cancel)
        metrics["deformable_metric"] = deformable_metric
        metrics.update(extra)

    check_cancel(cancel, "the registration")
    after = evaluate_metric(finest, sitk_metric, result_transform)
    metrics.update({
        "metric": metric_label(sitk_metric),
        "metric_before": _rounded(before),
        "metric_after": _rounded(after),
    })
    warnings_found = _check_divergence(before, after, start)
    if landmark_points is not None:
        metrics.update(_tre(result_transform, *landmark_points))
    metrics["runtime_s"] = round(time.perf_counter() - started, 3)
    metrics["warnings"] = warnings_found
    for message in warnings_found:
        log.warning(message)
        warnings.warn(message, RegistrationWarning, stacklevel=2)
    report(1.0, f"{kind} registration done")
    return RegistrationResult(result_transform, metrics, fixed, moving, initial_transform,
                              warnings_found)


def _deformable(fixed, moving, linear, metric, fixed_region, moving_region, backend, device,
                torch_settings, bspline_settings, progress, cancel):
    """Run the deformable stage; returns the composite transform and its metrics."""
    from MultiModalAnalysisLib.device import run_with_device_fallback

    chosen = "torch" if backend == "auto" else backend
    if chosen == "torch":
        field = run_with_device_fallback(
            lambda dev: register_deformable_torch(
                fixed, moving, linear, metric, fixed_mask=fixed_region,
                moving_mask=moving_region, settings=torch_settings, device=dev,
                progress=progress, cancel=cancel),
            device, what="deformable registration")
        array = sitk.GetArrayFromImage(field.GetDisplacementField())
        grid = field.GetDisplacementField()
        reference = sitk.Image(grid.GetSize(), sitk.sitkUInt8)
        reference.CopyInformation(grid)
        deformation = field
    else:
        deformation = register_deformable_bspline(
            fixed, moving, linear, metric,
            fixed_mask=fixed_region, moving_mask=moving_region, settings=bspline_settings,
            progress=progress, cancel=cancel)
        reference = _jacobian_grid(fixed)
        to_field = sitk.TransformToDisplacementFieldFilter()
        to_field.SetReferenceImage(reference)
        to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
        array = sitk.GetArrayFromImage(to_field.Execute(deformation))
    jacobian = jacobian_of_displacement(array, reference)
    stats = folding_statistics(jacobian)
    linear_det = float(np.linalg.det(matrix_offset(linear)[0]))
    return compose(linear, deformation), {
        "backend": chosen,
        # The whole transform's Jacobian is the linear part's (a constant) times the
        # deformation's; folding only depends on the latter.
        "jacobian_min": round(stats["jacobian_min"] * linear_det, 4),
        "jacobian_max": round(stats["jacobian_max"] * linear_det, 4),
        "folding_percent": round(stats["folding_percent"], 4),
        "jacobian_grid_mm": round(float(reference.GetSpacing()[0]), 2),
    }


def _jacobian_grid(fixed: sitk.Image, spacing: float = 2.0) -> sitk.Image:
    from MultiModalAnalysisLib.registration.prepare import downsample

    return downsample(fixed, [spacing] * 3)


def _check_divergence(before: float, after: float, start: str | None = None) -> list[str]:
    """Warnings when the registration lost overlap or ended worse than it started; ``start``
    ("given", "landmarks" or None) says where the starting pose came from, so the advice
    does not ask for an initial transform that was given."""
    help_ = {
        "given": "check the initial transform given (fixed -> moving, made for these two "
                 "images), or give masks around the region of interest",
        "landmarks": "check the landmarks (each fixed point paired with its moving point, LPS "
                     "mm), or give masks around the region of interest",
    }.get(start or "", "give an initial transform (e.g. from landmarks) or masks around the "
                       "region of interest")
    if not math.isfinite(after):
        return ["the registered images no longer overlap enough to compute the metric: the "
                f"registration diverged. Check the images; {help_}."]
    if math.isfinite(before) and after > before + 0.02 * abs(before) + 1e-6:
        return [f"the metric got worse during registration ({before:.4f} -> {after:.4f}, "
                "lower is better): the result is likely wrong. Check the QC figure (qc.png "
                f"of `mma register`, or RegistrationResult.qc_figure); {help_}."]
    return []


def _tre(transform: sitk.Transform, fixed_points: np.ndarray, moving_points: np.ndarray,
         ) -> dict[str, Any]:
    from MultiModalAnalysisLib.metrics import target_registration_error

    errors = target_registration_error(transform, fixed_points, moving_points)
    return {
        "tre_mm_mean": round(float(errors.mean()), 3),
        "tre_mm_median": round(float(np.median(errors)), 3),
        "tre_mm_max": round(float(errors.max()), 3),
        "landmark_pairs": int(len(errors)),
    }


def _choice(value: str, choices: Sequence[str], what: str) -> str:
    name = str(value).strip().lower()
    if name not in choices:
        raise ConfigError(f"unknown {what} '{value}': use one of {', '.join(choices)}.")
    return name


def _rounded(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None


def _levels_for(settings: LinearSettings, fixed: sitk.Image, moving: sitk.Image,
                ) -> LinearSettings:
    """Drop pyramid levels much finer than the coarser image can support (a 2 mm level
    adds nothing to a PET of 5 mm voxels but time); at least two levels stay."""
    coarsest = max(sorted(image.GetSpacing())[1] for image in (fixed, moving))  # in-plane
    keep = [i for i, s in enumerate(settings.spacings_mm) if s >= 0.7 * coarsest]
    keep = keep if len(keep) >= 2 else list(range(min(2, len(settings.spacings_mm))))
    if len(keep) == len(settings.spacings_mm):
        return settings

    def pick(values):
        return tuple(values[i] for i in keep)

    return replace(settings, spacings_mm=pick(settings.spacings_mm),
                   rigid_iterations=pick(settings.rigid_iterations),
                   affine_iterations=pick(settings.affine_iterations),
                   samples=pick(settings.samples))


def _narrow(settings: LinearSettings) -> LinearSettings:
    return replace(settings, search_shift_mm=settings.search_shift_mm / 2,
                   search_angle_deg=settings.search_angle_deg / 2)


def _without_search(settings: LinearSettings) -> LinearSettings:
    return replace(settings, search=False)
