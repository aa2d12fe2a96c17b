"""Global search for a rigid starting point: many candidate transforms scored at once.

Written here rather than with SimpleITK's exhaustive optimiser: that scores one transform
at a time with Mattes mutual information, whose estimate is biased upwards when fewer
samples land inside the other image, so on tightly cropped volumes the best-scored
candidates were often ones that slid the images apart. Here hundreds of candidates are
scored in one batched pass (trilinear sampling of the other image at the sample points
mapped by every candidate, ``scipy.ndimage.map_coordinates``) by normalised mutual
information, ``(H(F) + H(M)) / H(F, M)``, which does not reward shrinking the overlap;
candidates that keep fewer than half the samples inside the other image are dropped.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import map_coordinates

from MultiModalAnalysisLib.progress import check_cancel
from MultiModalAnalysisLib.registration.prepare import Level
from MultiModalAnalysisLib.registration.transforms import compose, matrix_offset

BINS = 16
MIN_OVERLAP = 0.5


@dataclass
class SearchSpace:
    """Samples of one image and the other image of a level, ready for batched scoring.

    The samples come from the image with the smaller physical volume (usually the moving
    one, cropped tighter), so that nearly all of them can land inside the other image;
    candidates then map either fixed samples forward or moving samples back.
    """

    points: np.ndarray  # N x 3 physical sample points (float32)
    sample_bins: np.ndarray  # N intensity bins of the sampled image
    target: np.ndarray  # [z, y, x] the other image's intensities scaled to [0, BINS)
    target_valid: np.ndarray | None  # [z, y, x] 1 inside the other image's mask
    to_index: np.ndarray  # 3 x 3: physical offset -> target continuous index (x, y, z)
    origin: np.ndarray
    from_moving: bool  # samples are moving points (candidates are applied inverted)

    @classmethod
    def from_level(cls, level: Level, samples: int, seed: int) -> SearchSpace:
        from_moving = _volume(level.moving) < _volume(level.fixed)
        source, source_mask = ((level.moving, level.moving_mask) if from_moving
                               else (level.fixed, level.fixed_mask))
        target, target_mask = ((level.fixed, level.fixed_mask) if from_moving
                               else (level.moving, level.moving_mask))
        array = sitk.GetArrayFromImage(source).astype(np.float32)
        keep = np.ones(array.shape, bool)
        if source_mask is not None:
            keep = sitk.GetArrayFromImage(source_mask) > 0
        index = np.argwhere(keep)  # z, y, x
        rng = np.random.default_rng(seed)
        if len(index) > samples:
            index = index[rng.choice(len(index), samples, replace=False)]
        direction = np.array(source.GetDirection()).reshape(3, 3)
        points = (np.array(source.GetOrigin())
                  + (index[:, ::-1] * np.array(source.GetSpacing())) @ direction.T)
        values = array[tuple(index.T)]
        target_array = sitk.GetArrayFromImage(target).astype(np.float32)
        target_valid = None
        if target_mask is not None:
            target_valid = (sitk.GetArrayFromImage(target_mask) > 0).astype(np.float32)
        t_direction = np.array(target.GetDirection()).reshape(3, 3)
        to_index = np.linalg.inv(t_direction @ np.diag(target.GetSpacing()))
        return cls(points.astype(np.float32), _to_bins(values, array[keep]),
                   _scale(target_array), target_valid, to_index, np.array(target.GetOrigin()),
                   from_moving)

    def score(self, transforms: Sequence[sitk.Transform]) -> np.ndarray:
        """Normalised mutual information of each (linear) fixed -> moving transform, higher
        is better; -inf when fewer than ``MIN_OVERLAP`` of the samples overlap."""
        count, n = len(transforms), len(self.points)
        matrices = np.empty((count, 3, 3))
        offsets = np.empty((count, 3))
        for k, transform in enumerate(transforms):
            matrix, offset = matrix_offset(transform)
            if self.from_moving:  # samples are moving points: apply the inverse
                matrix = np.linalg.inv(matrix)
                offset = -matrix @ offset
            # Composed with physical -> target voxel index, as (z, y, x) rows.
            matrices[k] = (self.to_index @ matrix)[::-1]
            offsets[k] = (self.to_index @ (offset - self.origin))[::-1]
        index = (np.einsum("kij,nj->ikn", matrices.astype(np.float32), self.points)
                 + offsets.T.astype(np.float32)[:, :, None]).reshape(3, -1)
        values = map_coordinates(self.target, index, order=1, mode="constant", cval=-1.0)
        valid = values >= 0
        if self.target_valid is not None:
            valid &= map_coordinates(self.target_valid, index, order=0, mode="constant",
                                     cval=0.0) > 0.5
        bins = np.clip(values, 0, BINS - 1).astype(np.int64)
        joint_index = (np.repeat(np.arange(count) * BINS * BINS, n)
                       + np.tile(self.sample_bins * BINS, count) + bins)
        joint = np.bincount(joint_index[valid], minlength=count * BINS * BINS)
        joint = joint.reshape(count, BINS, BINS).astype(float)
        total = joint.sum(axis=(1, 2))
        scores = np.full(count, -np.inf)
        ok = total >= MIN_OVERLAP * n
        if not ok.any():
            return scores
        p = joint[ok] / total[ok, None, None]
        scores[ok] = (_entropy(p.sum(axis=2)) + _entropy(p.sum(axis=1))) / _entropy(
            p.reshape(p.shape[0], -1))
        return scores


def _volume(image: sitk.Image) -> float:
    return float(np.prod(np.array(image.GetSize()) * np.array(image.GetSpacing())))


def _entropy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)


def _scale(array: np.ndarray) -> np.ndarray:
    low, high = float(array.min()), float(array.max())
    return ((array - low) / max(high - low, 1e-12) * (BINS - 1e-3)).astype(np.float32)


def _to_bins(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    low, high = float(reference.min()), float(reference.max())
    scaled = (values - low) / max(high - low, 1e-12) * (BINS - 1e-3)
    return np.clip(scaled, 0, BINS - 1).astype(np.int64)


def grid_around(start: sitk.Euler3DTransform, angle_rad: float, angle_steps: int,
                shift_mm: float, shift_steps: int) -> list[sitk.Euler3DTransform]:
    """Rigid transforms on a grid around ``start``: ``angle_steps`` rotations each way about
    every axis and ``shift_steps`` shifts each way along every axis."""
    base = np.array(start.GetParameters())
    angles = np.arange(-angle_steps, angle_steps + 1) * angle_rad
    shifts = np.arange(-shift_steps, shift_steps + 1) * shift_mm
    grid = []
    for ax in angles:
        for ay in angles:
            for az in angles:
                for tx in shifts:
                    for ty in shifts:
                        for tz in shifts:
                            transform = sitk.Euler3DTransform(start)
                            transform.SetParameters(
                                (base + np.array([ax, ay, az, tx, ty, tz])).tolist())
                            grid.append(transform)
    return grid


def best_distinct(transforms: Sequence[sitk.Euler3DTransform], scores: np.ndarray, keep: int,
                  min_angle_deg: float = 8.0, min_shift_mm: float = 4.0,
                  ) -> list[tuple[float, sitk.Euler3DTransform]]:
    """The ``keep`` best-scored transforms, skipping near-duplicates of better ones."""
    chosen: list[tuple[float, sitk.Euler3DTransform]] = []
    for k in np.argsort(-scores):
        if not math.isfinite(scores[k]):
            break
        params = np.array(transforms[k].GetParameters())
        if any(np.all(np.abs(params[:3] - np.array(c.GetParameters())[:3])
                      < math.radians(min_angle_deg))
               and np.linalg.norm(params[3:] - np.array(c.GetParameters())[3:]) < min_shift_mm
               for _, c in chosen):
            continue
        chosen.append((float(scores[k]), transforms[k]))
        if len(chosen) == keep:
            break
    return chosen


def refine(space: SearchSpace, start: sitk.Euler3DTransform, score: float, *,
           step_mm: float, min_step_mm: float, radius_mm: float = 50.0,
           iterations: int = 60, cancel: threading.Event | None = None,
           moving_initial: sitk.Transform | None = None,
           ) -> tuple[float, sitk.Euler3DTransform]:
    """Compass search: try a step each way along every parameter, move to the best that
    improves the score, halve the step when none does.

    Derivative-free, so it is not thrown off by a rough, noisy metric landscape the way a
    gradient step can be. Rotation steps are the angle that moves a point ``radius_mm`` from
    the centre by the shift step.
    """
    current, best, step = start, score, step_mm
    for _ in range(iterations):
        if step < min_step_mm:
            break
        check_cancel(cancel, "the registration")
        base = np.array(current.GetParameters())
        deltas = np.concatenate([np.eye(6), -np.eye(6)])
        deltas[:, :3] *= step / radius_mm
        deltas[:, 3:] *= step
        neighbours = []
        for delta in deltas:
            candidate = sitk.Euler3DTransform(current)
            candidate.SetParameters((base + delta).tolist())
            neighbours.append(candidate)
        scores = _score(space, neighbours, moving_initial)
        k = int(np.argmax(scores))
        if scores[k] > best:
            current, best = neighbours[k], float(scores[k])
        else:
            step /= 2
    return best, current


def _score(space: SearchSpace, candidates: Sequence[sitk.Transform],
           moving_initial: sitk.Transform | None) -> np.ndarray:
    if moving_initial is None:
        return space.score(candidates)
    return space.score([_then(moving_initial, c) for c in candidates])


def search_rigid_start(coarse: Level, fine: Level, starts: Sequence[sitk.Euler3DTransform], *,
                       moving_initial: sitk.Transform | None = None, shift_mm: float = 8.0,
                       angle_deg: float = 10.0, keep: int = 4, samples: int = 3000,
                       fine_samples: int = 8000, seed: int = 0,
                       cancel: threading.Event | None = None,
                       ) -> list[tuple[float, sitk.Euler3DTransform]]:
    """Best rigid starting points, best first (score: normalised MI on the ``fine`` level).

    On the ``coarse`` level, three grids, each around the best few points of the one before:
    shifts of up to two ``shift_mm`` steps each way (the largest error), rotations of up to
    two ``angle_deg`` steps about each axis, shifts on a grid twice as fine. The best
    ``keep`` points are refined by compass search on the coarse level, the best half of
    them again on the ``fine`` level, where a smoothed-away structure can no longer mislead.
    """
    space = SearchSpace.from_level(coarse, samples, seed)

    def scored(candidates: list[sitk.Euler3DTransform]) -> np.ndarray:
        check_cancel(cancel, "the registration")
        return _score(space, candidates, moving_initial)

    angle = math.radians(angle_deg)
    candidates = [t for s in starts for t in grid_around(s, 0.0, 0, shift_mm, 2)]
    best = best_distinct(candidates, scored(candidates), 2)
    candidates = [t for _, s in best for t in grid_around(s, angle, 2, 0.0, 0)]
    best = best_distinct(candidates, scored(candidates), keep)
    candidates = [t for _, s in best for t in grid_around(s, 0.0, 0, shift_mm / 2, 1)]
    best = best_distinct(candidates, scored(candidates), keep)
    best = [refine(space, t, v, step_mm=shift_mm / 2, min_step_mm=coarse.spacing_mm / 4,
                   iterations=12, cancel=cancel, moving_initial=moving_initial)
            for v, t in best]
    best = best_distinct([t for _, t in best], np.array([v for v, _ in best]), 2)
    fine_space = SearchSpace.from_level(fine, fine_samples, seed)
    step = fine.spacing_mm / 2
    refined = []
    for _, point in best:
        grid = grid_around(point, 0.0, 0, step, 1)
        _, point = best_distinct(grid, _score(fine_space, grid, moving_initial), 1)[0]
        grid = grid_around(point, math.radians(3.0), 1, 0.0, 0)
        value, point = best_distinct(grid, _score(fine_space, grid, moving_initial), 1)[0]
        refined.append(refine(fine_space, point, value, step_mm=step, min_step_mm=step / 4,
                              iterations=12, cancel=cancel, moving_initial=moving_initial))
    return sorted(refined, key=lambda item: -item[0])


def _then(initial: sitk.Transform, transform: sitk.Transform) -> sitk.Transform:
    return compose(initial, transform)
