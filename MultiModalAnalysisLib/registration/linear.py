"""Rigid and affine registration: SimpleITK, multi-resolution, with a robust start.

The start matters most: a local optimiser from a 15 degree / 20 mm error on a tightly
cropped volume often ends in the wrong basin. So before any optimisation, on the coarsest
level, the starting translations (identity or the given initial transform, image centres,
intensity centres of mass) are each combined with a grid of rotations; every combination is
scored by the metric, the best few are optimised locally at that level, and the winner is
refined on the finer levels (rigid, then affine when asked), last with many samples on the
finest level.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import GeometryError
from MultiModalAnalysisLib.progress import Progress, check_cancel
from MultiModalAnalysisLib.registration.prepare import Level, centre_of_mass, image_centre
from MultiModalAnalysisLib.registration.search import (
    Poses,
    SearchSpace,
    compass,
    compass_affine,
    default_threads,
    release_work,
    search_rigid_start,
)
from MultiModalAnalysisLib.registration.similarity import set_sitk_metric
from MultiModalAnalysisLib.registration.transforms import compose_linear, matrix_offset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearSettings:
    """How rigid/affine registration runs (defaults tuned on the STS CT/PET/MR crops).

    Attributes:
        spacings_mm: the resolution levels, coarse to fine (an image is never upsampled).
        rigid_iterations: optimiser iterations per level for the rigid stage.
        affine_iterations: per level for the affine stage (``None`` skips that level).
        samples: metric samples per level (random, fixed seed), capped by the voxel count.
        search: run the coarse rotation search.
        search_shift_mm, search_angle_deg: grid steps of the search (two shift steps and
            one angle step each way).
        search_samples, search_fine_samples: metric samples per pose on the coarse and the
            fine search level.
        search_screen_samples, search_screen_keep: the coarse grid is first scored with
            this many samples per pose, and only the best ``search_screen_keep`` poses are
            scored with ``search_samples`` (``None``: score the whole grid fully).
        search_keep: how many of the best search candidates are optimised locally.
        search_bins, search_edge_weighted, polish_bins, polish_edge_weighted: histogram
            bins and sampling of the search's and the final (polish, affine) stages' score
            (see ``search.SearchSpace.from_level``). Uniform samples and 32 bins: on the STS
            PET/CT pairs, edge-weighted samples and 16 bins led the search to poses worse
            than the start by Mattes MI.
        refine_samples: after the search and polish, the winning rigid pose is refined once
            more on the finest level by compass search with this many samples (quarter-voxel
            steps down to 1/16 voxel); ``None`` skips it. The search's own samples are too
            few to settle the flat optimum of these crops: on the 20 STS pairs, 40000
            samples here made the rigid result depend less on the start (median
            consistency 1.86 -> 1.47 mm PET, 1.66 -> 1.25 mm MR) while the 4 mm search
            dropped from 20000 samples per pose to 8000, at about the same time.
        threads: threads that score candidate poses (``None``: the cores this process may
            use, at most two; see ``search.default_threads``). The result does not depend
            on it, only the time.
        seed: random sampling seed (results are reproducible).
    """

    spacings_mm: tuple[float, ...] = (8.0, 4.0, 2.0)
    rigid_iterations: tuple[int, ...] = (60, 40, 25)
    affine_iterations: tuple[int | None, ...] = (None, 40, 40)
    samples: tuple[int, ...] = (20000, 10000, 10000)
    search: bool = True
    search_shift_mm: float = 8.0
    search_angle_deg: float = 10.0
    search_samples: int = 2000
    search_fine_samples: int = 8000
    search_screen_samples: int | None = 500
    search_screen_keep: int = 300
    search_keep: int = 10
    search_bins: int = 32
    search_edge_weighted: bool = False
    polish_bins: int = 32
    polish_edge_weighted: bool = False
    refine_samples: int | None = 40000
    threads: int | None = None
    seed: int = 20240611


class _Cancelled(Exception):
    """Raised inside a SimpleITK command to stop the optimiser."""


def _run(method: sitk.ImageRegistrationMethod, level: Level, cancel: threading.Event | None,
         on_iteration=None) -> sitk.Transform:
    """``method.Execute`` with a cancel check per iteration; ITK's own messages are hidden."""

    def command() -> None:
        if on_iteration is not None:
            on_iteration()
        if cancel is not None and cancel.is_set():
            raise _Cancelled()

    method.AddCommand(sitk.sitkIterationEvent, command)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return method.Execute(level.fixed, level.moving)
    except RuntimeError as error:
        check_cancel(cancel, "the registration")
        if "do not sufficiently overlap" in str(error):
            raise GeometryError(
                f"the registration moved the images apart on the {level.spacing_mm:g} mm "
                "level: no metric sample of the fixed image maps into the moving image (or "
                "its mask) any more. Check that both images show the same body region and "
                "that any masks cover it, or give an initial transform (e.g. from "
                "landmarks).") from None
        raise
    finally:
        method.RemoveAllCommands()


def _method(level: Level, metric: str, samples: int | None, seed: int,
            moving_initial: sitk.Transform | None) -> sitk.ImageRegistrationMethod:
    """A registration method for ``level``: ``samples`` random metric samples (``None``:
    every voxel in the fixed mask)."""
    method = sitk.ImageRegistrationMethod()
    set_sitk_metric(method, metric)
    fraction = 1.0 if samples is None else min(1.0, samples / max(level.fixed_voxels, 1))
    if fraction < 1.0:
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(fraction, seed)
    else:
        method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    if level.fixed_mask is not None:
        method.SetMetricFixedMask(level.fixed_mask)
    if level.moving_mask is not None:
        method.SetMetricMovingMask(level.moving_mask)
    if moving_initial is not None:
        method.SetMovingInitialTransform(moving_initial)
    return method


EVALUATION_VOXELS = 100_000
"""``evaluate_metric`` reads a regular subset of a level's fixed voxels (every s-th along
each axis), with the largest stride ``s`` that keeps at least this many of them."""


def evaluate_metric(level: Level, metric: str, transform: sitk.Transform) -> float:
    """The metric (lower is better) of ``transform`` on a level; NaN where nothing overlaps.

    Point-wise metrics (MI, NCC) read every s-th fixed voxel (in the fixed mask) along each
    axis, at least :data:`EVALUATION_VOXELS` of them (every voxel of a smaller level): the
    same samples for every transform, so before/after values compare like for like. Local
    NCC, whose neighbourhoods are counted in fixed voxels, reads every voxel.
    """
    # SimpleITK's MetricEvaluate ignores the sampling strategy (a 50000-sample request gave
    # the all-voxel value, in the same time), hence the subsampled fixed image.
    # No gradient images: the value needs none, and ITK would otherwise filter both images
    # for them first (a third to half of the call's time on the STS MR pairs' 2 mm level).
    # As the fixed "moving initial" transform: ITK would insist that an optimised transform
    # holding a displacement field be defined on the fixed grid.
    key = None
    if transform.IsLinear():  # remembered: the affine stage's choice and the report's
        matrix, offset = matrix_offset(transform)  # "after" read the same pose
        key = ("metric value", metric, np.round(np.concatenate([matrix.ravel(), offset]),
                                                 9).tobytes())
        if key in level.prepared:
            return level.prepared[key]
    fixed, fixed_mask = _evaluation_grid(level, metric)
    method = _method(level, metric, None, 0, transform)
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetMetricUseMovingImageGradientFilter(False)
    method.SetInitialTransform(sitk.Transform(3, sitk.sitkIdentity))
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            value = float(method.MetricEvaluate(fixed, level.moving))
    except RuntimeError:
        value = float("nan")
    if key is not None:
        level.prepared[key] = value
    return value


def _evaluation_grid(level: Level, metric: str) -> tuple[sitk.Image, sitk.Image | None]:
    """The fixed image (and mask) that ``evaluate_metric`` reads: every s-th voxel along
    each axis (``sitk.Shrink`` takes voxels, it does not average them), made once per
    level."""
    stride = 1
    if metric != "lncc":
        stride = max(1, int((level.fixed_voxels / EVALUATION_VOXELS) ** (1 / 3)))
    key = ("evaluation grid", stride)
    if key not in level.prepared:
        if stride == 1:
            level.prepared[key] = (level.fixed, level.fixed_mask)
        else:
            factors = [stride] * level.fixed.GetDimension()
            mask = level.fixed_mask
            fixed = sitk.Shrink(level.fixed, factors)
            if mask is not None:
                mask = sitk.Shrink(mask, factors)
                if not sitk.GetArrayViewFromImage(mask).any():  # a mask too thin to stride
                    fixed, mask = level.fixed, level.fixed_mask
            level.prepared[key] = (fixed, mask)
    return level.prepared[key]


def optimise(level: Level, metric: str, transform: sitk.Transform,
             moving_initial: sitk.Transform | None, iterations: int, samples: int, seed: int,
             cancel: threading.Event | None = None, progress: Progress | None = None,
             ) -> tuple[sitk.Transform, float]:
    """Local optimisation of ``transform`` (a copy) on one level; returns it and its metric.

    Regular-step gradient descent with parameter scales from physical shifts, so a step of
    1 moves voxels by about 1 mm whichever parameter changes; the first step is half the
    level's spacing and steps halve when the direction reverses.
    """
    method = _method(level, metric, samples, seed, moving_initial)
    _set_optimizer(method, OPTIMIZER, level, iterations)
    result = transform.__class__(transform)  # copy: the input is never modified
    method.SetInitialTransform(result, inPlace=True)
    counter = itertools.count(1)

    def report() -> None:
        if progress is not None:
            progress(next(counter) / iterations, f"{level.spacing_mm:g} mm level")

    _run(method, level, cancel, report)
    return result, float(method.GetMetricValue())


OPTIMIZER = "gdls"


def _set_optimizer(method, name, level, iterations):
    if name == "rsgd":
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=level.spacing_mm / 4, minStep=level.spacing_mm / 200,
            numberOfIterations=int(iterations), relaxationFactor=0.5,
            gradientMagnitudeTolerance=1e-8)
    elif name == "gdls":
        method.SetOptimizerAsGradientDescentLineSearch(
            1.0, int(iterations), convergenceMinimumValue=1e-6, convergenceWindowSize=5,
            lineSearchUpperLimit=3.0, lineSearchMaximumIterations=10,
            maximumStepSizeInPhysicalUnits=level.spacing_mm)
    elif name == "cg":
        method.SetOptimizerAsConjugateGradientLineSearch(
            1.0, int(iterations), convergenceMinimumValue=1e-6, convergenceWindowSize=5,
            lineSearchUpperLimit=3.0, lineSearchMaximumIterations=10,
            maximumStepSizeInPhysicalUnits=level.spacing_mm)
    elif name == "lbfgs":
        method.SetOptimizerAsLBFGS2(numberOfIterations=int(iterations))
    elif name == "powell":
        method.SetOptimizerAsPowell(numberOfIterations=int(iterations) // 8 + 1,
                                    maximumLineIterations=10, stepLength=level.spacing_mm / 2,
                                    stepTolerance=level.spacing_mm / 100, valueTolerance=1e-5)
    elif name == "amoeba":
        method.SetOptimizerAsAmoeba(simplexDelta=level.spacing_mm / 2,
                                    numberOfIterations=int(iterations) * 3)
    method.SetOptimizerScalesFromPhysicalShift()


def starting_transforms(level: Level, centre: np.ndarray) -> list[sitk.Euler3DTransform]:
    """Rigid starts about ``centre``: identity, image centres matched, centres of mass matched."""
    shifts = [np.zeros(3), image_centre(level.moving) - image_centre(level.fixed)]
    shifts.append(centre_of_mass(level.moving, level.moving_mask)
                  - centre_of_mass(level.fixed, level.fixed_mask))
    starts: list[sitk.Euler3DTransform] = []
    for shift in shifts:
        if any(np.linalg.norm(shift - np.array(s.GetTranslation())) < 10.0 for s in starts):
            continue  # the search grid around a start already covers 10 mm
        transform = sitk.Euler3DTransform()
        transform.SetCenter(centre.tolist())
        transform.SetTranslation(shift.tolist())
        starts.append(transform)
    return starts


def overlap_fraction(level: Level, transform: sitk.Transform) -> float:
    """Fraction of the fixed region (mask or whole grid) that ``transform`` maps into the
    moving image's field of view (checked on a grid of about 12^3 points)."""
    size = np.array(level.fixed.GetSize())
    axes = [np.unique(np.linspace(0, n - 1, 12).round().astype(int)) for n in size]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)  # x, y, z
    if level.fixed_mask is not None:
        mask = sitk.GetArrayViewFromImage(level.fixed_mask)
        grid = grid[mask[grid[:, 2], grid[:, 1], grid[:, 0]] > 0]
        if len(grid) == 0:
            return 0.0
    points = _index_to_physical(level.fixed, grid)
    if transform.IsLinear():
        matrix, offset = matrix_offset(transform)
        mapped = points @ matrix.T + offset
    else:
        mapped = np.array([transform.TransformPoint(tuple(p)) for p in points])
    index = _physical_to_index(level.moving, mapped)
    inside = np.all((index >= -0.5) & (index <= np.array(level.moving.GetSize()) - 0.5), axis=1)
    return float(inside.mean())


def _index_to_physical(image: sitk.Image, index: np.ndarray) -> np.ndarray:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + (index * np.array(image.GetSpacing())) @ direction.T


def _physical_to_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    to_index = np.linalg.inv(direction @ np.diag(image.GetSpacing()))
    return (points - np.array(image.GetOrigin())) @ to_index.T


def rigid_to_affine(rigid: sitk.Euler3DTransform) -> sitk.AffineTransform:
    """The same mapping as an affine transform (same centre), ready for affine optimisation."""
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    return affine


def register_linear(levels: Sequence[Level], kind: str, metric: str,
                    initial_transform: sitk.Transform | None = None,
                    settings: LinearSettings | None = None, *,
                    search_levels: Sequence[Level] | None = None,
                    progress: Progress | None = None,
                    cancel: threading.Event | None = None) -> sitk.Transform:
    """Rigid or affine registration over a pyramid; returns the fixed -> moving transform.

    Args:
        levels: the pyramid from ``prepare.build_pyramid`` (coarse to fine), one per entry of
            ``settings.spacings_mm``.
        kind: ``"rigid"`` or ``"affine"``.
        metric: a concrete metric (``"mi"``, ``"ncc"``, ``"lncc"``).
        initial_transform: applied first (fixed -> moving); the search and optimisation
            look for a correction on top of it.
        settings: see :class:`LinearSettings`.
        search_levels: the levels the search for a start scores (the same images with
            other masks: without a region of interest), ``levels`` by default.

    Raises:
        GeometryError: no start maps the fixed region into the moving image at all.
    """
    try:
        return _register_linear(levels, kind, metric, initial_transform,
                                settings or LinearSettings(), progress or Progress(), cancel,
                                search_levels or levels)
    finally:
        release_work()  # the scoring's work arrays (tens of MB)


def _register_linear(levels: Sequence[Level], kind: str, metric: str,
                     initial_transform: sitk.Transform | None, settings: LinearSettings,
                     report: Progress, cancel: threading.Event | None,
                     search_levels: Sequence[Level]) -> sitk.Transform:
    coarse = levels[0]
    centre = (centre_of_mass(coarse.fixed_mask, None) if coarse.fixed_mask is not None
              else image_centre(coarse.fixed))
    starts = starting_transforms(search_levels[0], centre) if initial_transform is None else [
        _euler_at(centre)]
    starts = [s for s in starts if overlap_fraction(coarse, _then(initial_transform, s)) > 0.05]
    if not starts and initial_transform is not None:
        raise GeometryError(
            "the moving image does not overlap the fixed image through the initial transform "
            "(given, or from the landmarks). Check it: it maps fixed points to moving points "
            "(ITK's convention, as `mma register` writes it) and belongs to these two images.")
    if not starts:
        raise GeometryError(
            "the moving image does not overlap the fixed image after initialisation (neither "
            "as placed, nor with their centres matched). Check that both images show the same "
            "body region, or give an initial transform (e.g. from landmarks)."
        )

    check_cancel(cancel, "the registration")
    # progress: the rigid stage takes [0, share] (about half an affine registration's time)
    share = 0.5 if kind == "affine" else 1.0
    rigid_report = report.sub(0.0, share)
    transform = starts[0]
    fine = min(1, len(levels) - 1)
    spaces: dict[int, SearchSpace] = {}  # polish spaces by level, shared with the affine stage
    first_rigid = 0
    if settings.search and (initial_transform is None or initial_transform.IsLinear()):
        found = search_rigid_start(
            search_levels[0], search_levels[fine], centre, [s.GetParameters() for s in starts],
            moving_initial=initial_transform, shift_mm=settings.search_shift_mm,
            angle_deg=settings.search_angle_deg, keep=settings.search_keep,
            samples=settings.search_samples, fine_samples=settings.search_fine_samples,
            screen_samples=settings.search_screen_samples,
            screen_keep=settings.search_screen_keep,
            seed=settings.seed, bins=settings.search_bins,
            edge_weighted=settings.search_edge_weighted, threads=_threads(settings),
            cancel=cancel)
        rigid_report(0.35, "search for a start done")
        if found:
            # Polish the two best on the finer levels with the search's own score (compass
            # search), keeping the better: a gradient optimiser of Mattes MI started here
            # wandered several mm along the flat directions these crops have.
            first_rigid = len(levels)
            finalists = [t for _, t in found[:2]]
            for index in range(fine + 1, len(levels)):
                space = _polish_space(levels, index, settings, spaces)
                polished = [polish_rigid(space, levels[index], t, initial_transform, cancel)
                            for t in finalists]
                finalists = [max(polished, key=lambda t, space=space: space.score_transforms(
                    [_then(initial_transform, t)])[0])]
                rigid_report(0.35 + 0.35 * (index - fine) / max(len(levels) - 1 - fine, 1),
                             f"polished on the {levels[index].spacing_mm:g} mm level")
            transform = finalists[0]
            if settings.refine_samples:
                transform = refine_rigid(levels[-1], transform, initial_transform, settings,
                                         cancel)
                rigid_report(0.95, "refined")
            transform = _in_metric(levels[-1], metric, transform, initial_transform,
                                   settings.rigid_iterations[-1], settings, cancel)

    if first_rigid < len(levels):  # no search: classic multi-resolution optimisation
        for index in range(first_rigid, len(levels)):
            start = (index - first_rigid) / (len(levels) - first_rigid)
            transform, _ = optimise(levels[index], metric, transform, initial_transform,
                                    settings.rigid_iterations[index], settings.samples[index],
                                    settings.seed, cancel, rigid_report.sub(
                                        start, start + 1 / (len(levels) - first_rigid)))
    rigid_report(1.0, "rigid stage done")
    if kind == "affine":
        rigid = transform
        affine = _affine_stage(levels, rigid, initial_transform, settings, spaces, cancel,
                               report.sub(share, 0.95))
        affine = _in_metric(levels[-1], metric, affine, initial_transform,
                            settings.affine_iterations[-1] or settings.rigid_iterations[-1],
                            settings, cancel)
        # The affine stage's twelve parameters can fit its samples' score and lose on the
        # image (an aligned BraTS pair: Mattes MI -0.384 rigid, -0.351 affine, worse than
        # the start): the freed affine is kept only when the metric asked for agrees.
        transform = min((rigid_to_affine(rigid), affine), key=lambda t: _score(
            levels[-1], metric, _then(initial_transform, t), prefer=t is affine))
    report(1.0, f"{kind} registration done")
    return _then(initial_transform, transform)


def _score(level: Level, metric: str, transform: sitk.Transform, *, prefer: bool) -> tuple:
    """A sort key: the metric (lower is better; NaN last), ``prefer`` breaking ties."""
    value = evaluate_metric(level, metric, transform)
    return (value if np.isfinite(value) else np.inf, not prefer)


def _in_metric(level: Level, metric: str, transform: sitk.Transform,
               initial: sitk.Transform | None, iterations: int, settings: LinearSettings,
               cancel: threading.Event | None) -> sitk.Transform:
    """The search's result given the last word in ``metric`` when that is not MI.

    The search, polish, refinement and affine stage score normalised mutual information,
    which finds the pose from far starts for any pair of images. When another metric is
    asked for (NCC or local NCC, which ``auto`` takes within one modality, or the user's
    choice), a local optimisation of that metric on the finest level follows, kept when
    it scores better in that metric than the MI optimum it started from.
    """
    if metric == "mi":
        return transform
    optimised, _ = optimise(level, metric, transform, initial, iterations,
                            settings.samples[-1], settings.seed, cancel)
    before = _score(level, metric, _then(initial, transform), prefer=False)
    after = _score(level, metric, _then(initial, optimised), prefer=True)
    return optimised if after < before else transform


def _affine_stage(levels: Sequence[Level], rigid: sitk.Euler3DTransform,
                  initial: sitk.Transform | None, settings: LinearSettings,
                  spaces: dict[int, SearchSpace],
                  cancel: threading.Event | None,
                  report: Progress | None = None) -> sitk.AffineTransform:
    """The rigid result freed to an affine one by compass search of normalised MI on the
    levels that have affine iterations (a gradient optimiser of Mattes MI wandered)."""
    centre = np.array(rigid.GetCenter())
    matrix = np.array(rigid.GetMatrix()).reshape(3, 3)
    translation = np.array(rigid.GetTranslation())
    outer = matrix_offset(initial) if initial is not None else None
    used = [i for i in range(len(levels)) if settings.affine_iterations[i] is not None]
    for done, index in enumerate(used):
        level = levels[index]
        space = _polish_space(levels, index, settings, spaces)
        matrix, translation, _ = compass_affine(
            space, matrix, centre, translation, step_mm=level.spacing_mm / 2,
            min_step_mm=level.spacing_mm / 16, iterations=settings.affine_iterations[index],
            initial=outer, cancel=cancel)
        if report is not None:
            report((done + 1) / len(used), f"affine on the {level.spacing_mm:g} mm level")
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre.tolist())
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation(translation.tolist())
    return affine


def _polish_space(levels: Sequence[Level], index: int, settings: LinearSettings,
                  spaces: dict[int, SearchSpace]) -> SearchSpace:
    """The polish's samples of ``levels[index]``, built once per registration (the rigid
    polish and the affine stage score the same level alike)."""
    if index not in spaces:
        spaces[index] = SearchSpace.from_level(
            levels[index], settings.samples[index], settings.seed, bins=settings.polish_bins,
            edge_weighted=settings.polish_edge_weighted, threads=_threads(settings))
    return spaces[index]


def polish_rigid(space: SearchSpace, level: Level, transform: sitk.Euler3DTransform,
                 initial: sitk.Transform | None, cancel: threading.Event | None = None,
                 *, first_step: float = 0.5) -> sitk.Euler3DTransform:
    """Compass search of normalised MI on one level from ``transform`` (steps of
    ``first_step`` voxel, half a voxel by default, down to 1/16 voxel)."""
    poses = Poses(np.array(transform.GetCenter()),
                  matrix_offset(initial) if initial is not None else None)
    params = np.array([transform.GetParameters()])
    params, _ = compass(space, poses, params, space.score_poses(poses, params),
                        step_mm=level.spacing_mm * first_step,
                        min_step_mm=level.spacing_mm / 16, iterations=30, cancel=cancel)
    return poses.transform(params[0])


def refine_rigid(level: Level, transform: sitk.Euler3DTransform,
                 initial: sitk.Transform | None, settings: LinearSettings,
                 cancel: threading.Event | None = None) -> sitk.Euler3DTransform:
    """One pose's last compass search on ``level`` (the finest) with
    ``settings.refine_samples`` samples (another draw than the polish's), from quarter-voxel
    steps down to 1/16 voxel: the pose is already within a step or two of the optimum, so
    few, costly scores suffice."""
    space = SearchSpace.from_level(level, settings.refine_samples, settings.seed + 1,
                                   bins=settings.polish_bins,
                                   edge_weighted=settings.polish_edge_weighted,
                                   threads=_threads(settings))
    return polish_rigid(space, level, transform, initial, cancel, first_step=0.25)


def _threads(settings: LinearSettings) -> int:
    return settings.threads if settings.threads is not None else default_threads()


def _euler_at(centre: np.ndarray) -> sitk.Euler3DTransform:
    transform = sitk.Euler3DTransform()
    transform.SetCenter([float(c) for c in centre])
    return transform


def _then(initial: sitk.Transform | None, transform: sitk.Transform) -> sitk.Transform:
    """``initial o transform`` (transform applied first), as one linear transform if both
    are linear."""
    if initial is None:
        return transform
    return compose_linear(initial, transform)


def _distinct(scored: list[tuple[float, sitk.Euler3DTransform]], keep: int,
              ) -> list[tuple[float, sitk.Euler3DTransform]]:
    """The ``keep`` best candidates, skipping near-duplicates (< 8 deg and < 4 mm apart)."""
    chosen: list[tuple[float, sitk.Euler3DTransform]] = []
    for value, candidate in scored:
        params = np.array(candidate.GetParameters())
        if any(np.all(np.abs(params[:3] - np.array(c.GetParameters())[:3]) < math.radians(8))
               and np.linalg.norm(params[3:] - np.array(c.GetParameters())[3:]) < 4.0
               for _, c in chosen):
            continue
        chosen.append((value, candidate))
        if len(chosen) == keep:
            break
    return chosen
