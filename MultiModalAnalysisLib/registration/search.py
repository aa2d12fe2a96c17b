"""Global search for a rigid starting point: thousands of candidate poses scored at once.

Written here rather than with SimpleITK's exhaustive optimiser: that scores one transform
at a time with Mattes mutual information, whose estimate is biased upwards when fewer
samples land inside the other image, so on tightly cropped volumes the best-scored
candidates were often ones that slid the images apart. Here candidates are rows of Euler
parameters, scored in vectorised, cache-sized batches (trilinear sampling of the other image
at the sample points mapped by every candidate, :class:`LinearSampler`) by normalised
mutual information, ``(H(F) + H(M)) / H(F, M)``, which does not reward shrinking the
overlap; candidates that keep fewer than half the samples inside the other image are
dropped.

The search itself: a joint grid of rotations and shifts on a coarse level shortlists poses
(rotation and shift must be searched together: with a 10 degree rotation error, the right
shift scores worse than a wrong one), compass searches refine the shortlist on the coarse
level and then on a finer one, where the final choice is made (the coarse optimum can sit
several millimetres from the fine one).
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import map_coordinates
from scipy.special import xlogy

from MultiModalAnalysisLib.progress import check_cancel
from MultiModalAnalysisLib.registration.prepare import Level
from MultiModalAnalysisLib.registration.transforms import matrix_offset

BINS = 16
MIN_OVERLAP = 0.5
AROUND_MM = 10.0
"""How far around a region's bounding box the other image's intensities are read for its
bins: what a pose near the right one can map the region onto."""


def euler_matrices(angles: np.ndarray) -> np.ndarray:
    """Rotation matrices (K, 3, 3) of ITK's ``Euler3DTransform`` for angles (K, 3) about x,
    y, z (ITK composes them as Rz Rx Ry)."""
    cx, cy, cz = np.cos(angles).T
    sx, sy, sz = np.sin(angles).T
    matrices = np.empty((len(angles), 3, 3))
    matrices[:, 0, 0] = cz * cy - sz * sx * sy
    matrices[:, 0, 1] = -sz * cx
    matrices[:, 0, 2] = cz * sy + sz * sx * cy
    matrices[:, 1, 0] = sz * cy + cz * sx * sy
    matrices[:, 1, 1] = cz * cx
    matrices[:, 1, 2] = sz * sy - cz * sx * cy
    matrices[:, 2, 0] = -cx * sy
    matrices[:, 2, 1] = sx
    matrices[:, 2, 2] = cx * cy
    return matrices


@dataclass
class Poses:
    """Rigid poses ``x -> R(x - c) + c + t`` about one centre, applied after (inside) an
    optional linear initial transform: ``T(x) = initial(R(x - c) + c + t)``."""

    centre: np.ndarray
    initial: tuple[np.ndarray, np.ndarray] | None = None  # (matrix, offset)

    def affine(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Matrices (K, 3, 3) and offsets (K, 3) of the fixed -> moving maps."""
        rotations = euler_matrices(params[:, :3])
        offsets = self.centre + params[:, 3:] - rotations @ self.centre
        if self.initial is not None:
            matrix, offset = self.initial
            rotations = matrix @ rotations
            offsets = offsets @ matrix.T + offset
        return rotations, offsets

    def transform(self, params: Sequence[float]) -> sitk.Euler3DTransform:
        result = sitk.Euler3DTransform()
        result.SetCenter(self.centre.tolist())
        result.SetParameters([float(p) for p in params])
        return result


class LinearSampler:
    """Trilinear sampling of one volume, many times, and whether each sample is usable:
    inside the grid (0 .. size - 1 on every axis) and, with ``valid``, its nearest voxel
    non-zero there. Values where a sample is not usable are meaningless.

    Where usable, the same values as ``scipy.ndimage.map_coordinates(order=1)`` (and
    ``order=0`` for ``valid``), five times faster than those two calls (25-30 ns per sample
    packed, 34-38 read in place, 150 for scipy; 20000 samples of a 60 x 90 x 90 volume,
    one core of the benchmark machine). Volumes up to
    ``PACK_VOXELS`` are packed once: each voxel holds its cell's eight corner values side
    by side, so a sample reads one cache line instead of eight scattered values, and the
    eight corners' mask values as the bits of a byte (the nearest voxel is one of the
    corners). Larger volumes are read in place (eight reads per sample), to bound memory.

    Args:
        volume: [z, y, x] (any axis order; ``index`` rows follow it).
        valid: same shape, non-zero where samples are usable; ``None``: everywhere.
        pack: force (``True``) or forbid (``False``) the packed layout; default by size.
    """

    PACK_VOXELS = 1 << 22  # 4 M voxels: 128 MB packed

    def __init__(self, volume: np.ndarray, valid: np.ndarray | None = None, *,
                 pack: bool | None = None):
        self.volume = np.ascontiguousarray(volume)
        self.valid = None if valid is None else np.ascontiguousarray(valid) > 0.5
        self.shape = np.array(self.volume.shape)
        self.general = bool(self.shape.min() < 2)  # no cell along an axis: scipy's routine
        if pack is None:
            pack = self.volume.size <= self.PACK_VOXELS
        self.corners = self.corner_bits = None
        if self.general:  # scipy reads the mask as float: convert it once, not per call
            self.valid_values = None if self.valid is None else self.valid.astype(np.float32)
        else:
            strides = np.array(self.volume.strides) // self.volume.itemsize
            # Corner k = (dz, dy, dx) bits of k, in the order the interpolation reads them.
            steps = [(k >> 2, (k >> 1) & 1, k & 1) for k in range(8)]
            self.offsets = np.array([np.dot(step, strides) for step in steps])
            if pack:
                self.corners, self.corner_bits = self._pack(steps)

    def _pack(self, steps: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray | None]:
        """(voxels, 8) corner values; (voxels,) uint8 corner mask bits (``None`` without a
        mask). Voxels on a grid's upper face get padding as corners, never read: a sample
        interpolates in the cell below (its cell index is clamped to size - 2)."""
        size = self.volume.shape
        padded = np.pad(self.volume, [(0, 1)] * 3)
        corners = np.empty(size + (8,), self.volume.dtype)
        for k, (dz, dy, dx) in enumerate(steps):
            corners[..., k] = padded[dz:dz + size[0], dy:dy + size[1], dx:dx + size[2]]
        bits = None
        if self.valid is not None:
            padded = np.pad(self.valid, [(0, 1)] * 3)
            bits = np.zeros(size, np.uint8)
            for k, (dz, dy, dx) in enumerate(steps):
                bits |= padded[dz:dz + size[0], dy:dy + size[1], dx:dx + size[2]].astype(
                    np.uint8) << k
            bits = bits.reshape(-1)
        return corners.reshape(-1, 8), bits

    def __call__(self, index: np.ndarray, chunk: int | None = None, *,
                 reuse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Values and usability at ``index`` (3, N), computed ``chunk`` samples at a time
        (default ``_CHUNK``). With ``reuse``, the two arrays returned are this thread's work
        arrays (see ``_work``), overwritten by its next call; new arrays otherwise."""
        if self.general:
            values = map_coordinates(self.volume, index, order=1, mode="constant", cval=-1.0)
            inside = np.all((index >= 0) & (index <= self.shape[:, None] - 1), axis=0)
            if self.valid is not None:
                inside &= map_coordinates(self.valid_values, index, order=0,
                                          mode="constant") > 0.5
            return values, inside
        count = index.shape[1]
        if reuse:
            values = _work("values", (count,), self.volume.dtype)
            usable = _work("usable", (count,), bool)
        else:
            values, usable = np.empty(count, self.volume.dtype), np.empty(count, bool)
        chunk = chunk or _CHUNK
        for start in range(0, count, chunk):  # chunks small enough to stay in cache
            part = slice(start, start + chunk)
            self._trilinear(index[:, part], values[part], usable[part])
        return values, usable

    def _trilinear(self, index: np.ndarray, values: np.ndarray, usable: np.ndarray) -> None:
        """Values and usability at ``index`` (3, n) into ``values`` and ``usable`` (n,).

        Every intermediate lives in this thread's work arrays. Allocated afresh per chunk,
        they were tens of MB per score, which the C allocator, depending on its state, could
        map from the system and give back on every chunk: in the project's test environment,
        on 14 of the 40 STS rigid pairs, about 250 000 page faults per registration, and two
        scoring threads slower than one."""
        n = index.shape[1]
        upper = (self.shape - 1).astype(index.dtype)[:, None]
        test = _work("test", (n,), bool)
        usable.fill(True)
        for axis in range(3):
            usable &= np.greater_equal(index[axis], 0, out=test)
            usable &= np.less_equal(index[axis], upper[axis], out=test)
        low = np.floor(index, out=_work("weights", (3, n), index.dtype))
        np.minimum(low, upper - 1, out=low)  # the last cell holds the upper edge
        np.maximum(low, 0, out=low)
        # The cell's first corner, as a flat index: sum of whole-number index times stride.
        origin, term = _work("origin", (n,), np.intp), _work("term", (n,), np.intp)
        np.copyto(origin, low[0], casting="unsafe")
        origin *= self.offsets[4]  # z stride
        for axis, stride in ((1, self.offsets[2]), (2, self.offsets[1])):  # y, x
            np.copyto(term, low[axis], casting="unsafe")
            term *= stride
            origin += term
        wz, wy, wx = np.subtract(index, low, out=low)  # weights within the cell
        if self.corners is not None:
            # mode "clip": the cells are in range, and "raise" would buffer the output
            corner = np.take(self.corners, origin, axis=0, mode="clip",
                             out=_work("corner", (n, 8), self.volume.dtype))
            c = [corner[:, k] for k in range(8)]  # (n, 8): one cache line per sample
        else:
            flat = self.volume.reshape(-1)
            gathered = _work("corner", (8, n), self.volume.dtype)
            for k, offset in enumerate(self.offsets):
                np.take(flat, np.add(origin, offset, out=term), mode="clip", out=gathered[k])
            c = list(gathered)
        lerp = _work("lerp", (3, n), self.volume.dtype)
        _lerp(c[0], c[1], wx, lerp[0])  # along x, then y: the face at z
        _lerp(c[2], c[3], wx, lerp[1])
        _lerp(lerp[0], lerp[1], wy, lerp[1])
        _lerp(c[4], c[5], wx, lerp[0])  # the face at z + 1
        _lerp(c[6], c[7], wx, lerp[2])
        _lerp(lerp[0], lerp[2], wy, lerp[2])
        _lerp(lerp[1], lerp[2], wz, values)  # along z
        if self.valid is not None:
            nearest = _work("nearest", (n,), np.uint8)  # corner 4z + 2y + x
            np.copyto(nearest, np.greater_equal(wz, 0.5, out=test))
            nearest <<= 1
            nearest |= np.greater_equal(wy, 0.5, out=test)
            nearest <<= 1
            nearest |= np.greater_equal(wx, 0.5, out=test)
            if self.corner_bits is not None:
                bits = np.take(self.corner_bits, origin, mode="clip",
                               out=_work("bits", (n,), np.uint8))
                np.right_shift(bits, nearest, out=bits)
                bits &= 1
                usable &= bits.view(bool)
            else:
                index_of = np.take(self.offsets, nearest, mode="clip", out=term)
                index_of += origin
                usable &= np.take(self.valid.reshape(-1), index_of, mode="clip",
                                  out=_work("bits", (n,), bool))


_CHUNK = 32768
"""Samples per batch of a sampler and of a score (float32 work arrays of 128 kB stay in
the cache: the in-place sampler took 55-60 ns per sample so, 90 in one pass over every
sample)."""

_THREAD_CHUNK = 131072
"""Samples per batch (poses times samples) when a score is split between threads. Each
thread's numpy calls release the interpreter lock only while they run, so the calls must be
long enough for the threads to overlap. Two threads against one, on single scores of the
sizes a registration makes (88 000 to 1.7 million samples; 2-core benchmark machine,
medians of 25): batches of 32768 gained nothing (0.9-1.2x), 65536 gave 1.2-1.6x, 131072
1.3-1.8x; batches of 262144 fell out of the cache (about 2x slower than 131072). Scores of
at least half a batch are split, into at least one batch per thread; smaller ones are
not."""

MAX_THREADS = 2
"""The most threads a score is split between by default (the most measured: the benchmark
machine has two cores)."""


def default_threads() -> int:
    """Threads for scoring: the cores this process may use, at most ``MAX_THREADS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cores))


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``threads`` workers, made on first use. Keyed by process too: a
    child forked after the parent used a pool inherits the pool but not its threads (work
    given to it would wait forever), so the child makes its own."""
    key = (os.getpid(), threads)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="mma-score")
        return _POOLS[key]


def _lerp(a: np.ndarray, b: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
    """``a + (b - a) * weight`` into ``out`` (which may be ``b``, not ``a``)."""
    np.subtract(b, a, out=out)
    out *= weight
    out += a


_WORK: dict[int, dict[tuple[str, object], np.ndarray]] = {}
"""Work arrays of the scoring, per thread (``threading.get_ident``): reused from chunk to
chunk and score to score, freed by ``release_work``."""


def _work(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """This thread's work array ``name`` of ``dtype`` (as given: a type or a dtype), viewed as
    ``shape`` (contents undefined); made again only when a larger one is asked for."""
    thread = threading.get_ident()
    arrays = _WORK.get(thread)
    if arrays is None:
        arrays = _WORK[thread] = {}
    size = math.prod(shape)
    array = arrays.get((name, dtype))
    if array is None or array.size < size:
        array = arrays[(name, dtype)] = np.empty(size, dtype)
    return array[:size].reshape(shape)


def release_work() -> None:
    """Free every thread's scoring work arrays (tens of MB): at the end of a registration.
    A score running meanwhile keeps the arrays it holds, and its next chunk makes new ones."""
    _WORK.clear()


@dataclass
class SearchSpace:
    """Samples of one image and the other image of a level, ready for batched scoring.

    The samples come from the image with the smaller physical volume (usually the moving
    one, cropped tighter), so that nearly all of them can land inside the other image;
    candidates then map either fixed samples forward or moving samples back.
    """

    points: np.ndarray  # N x 3 physical sample points
    sample_bins: np.ndarray  # N intensity bins of the sampled image
    target: np.ndarray  # [z, y, x] the other image's intensities scaled to [0, BINS)
    to_index: np.ndarray  # 3 x 3: physical offset -> target continuous index (x, y, z)
    origin: np.ndarray
    from_moving: bool  # samples are moving points (candidates are applied inverted)
    sampler: LinearSampler = field(repr=False)  # of target, inside the other image's mask
    bins: int = BINS
    threads: int = 1  # threads a large score is split between (see ``score``)

    @classmethod
    def from_level(cls, level: Level, samples: int, seed: int, *, bins: int = BINS,
                   edge_weighted: bool = True, threads: int = 1) -> SearchSpace:
        """Samples of ``level`` for scoring.

        Args:
            samples: how many (all voxels when fewer).
            seed: sampling seed.
            bins: histogram bins per image.
            edge_weighted: draw half the samples where the image has edges (sharper scores
                for a coarse search); uniform sampling otherwise (an unbiased estimate of
                the image-wide mutual information, for the final polish).
            threads: threads a large score is split between (see :meth:`score`).

        The other image's volume (scaled to ``bins`` and packed for the sampler, the costly
        part: up to 0.2 s on a 2 mm level) is prepared once per level and bin count and
        shared by every space of that level (``level.prepared``); only the samples are new.
        """
        fixed_region = _region(level.fixed_mask, level.fixed_region)
        moving_region = _region(level.moving_mask, level.moving_region)
        from_moving = (_scored_volume(level.moving, moving_region)
                       < _scored_volume(level.fixed, fixed_region))
        source, source_mask = ((level.moving, level.moving_mask) if from_moving
                               else (level.fixed, level.fixed_mask))
        target, target_mask = ((level.fixed, level.fixed_mask) if from_moving
                               else (level.moving, level.moving_mask))
        array = sitk.GetArrayFromImage(source).astype(np.float32)
        keep = np.ones(array.shape, bool)
        if source_mask is not None:
            keep = sitk.GetArrayFromImage(source_mask) > 0
        source_region, target_region = ((moving_region, fixed_region) if from_moving
                                        else (fixed_region, moving_region))
        index = np.argwhere(keep)  # z, y, x
        rng = np.random.default_rng(seed)
        if len(index) > samples and not edge_weighted:
            index = index[rng.choice(len(index), samples, replace=False)]
        elif len(index) > samples:
            # Half the samples uniform, half where the image has edges: homogeneous regions
            # say little about alignment, so edge samples sharpen the score for their cost.
            gradient = np.sqrt(sum(g ** 2 for g in np.gradient(array)))[tuple(index.T)]
            weight = 0.5 / len(index) + 0.5 * gradient / max(gradient.sum(), 1e-12)
            index = index[rng.choice(len(index), samples, replace=False, p=weight / weight.sum())]
        # Sub-voxel jitter, so that samples do not all sit on the voxel grid (which favours
        # grid-aligned poses).
        jittered = index + rng.uniform(-0.5, 0.5, index.shape)
        direction = np.array(source.GetDirection()).reshape(3, 3)
        points = (np.array(source.GetOrigin())
                  + (jittered[:, ::-1] * np.array(source.GetSpacing())) @ direction.T)
        values = map_coordinates(array, jittered.T, order=1, mode="nearest")
        target_array, to_index, sampler = _prepared_target(
            level, target, target_mask, target_region, bins, (source, source_region),
            from_moving)
        # In a small region (a lesion), the image's full range leaves the region's
        # intensities in a bin or two: bin by its quantiles there instead.
        edges = _quantile_edges(array[keep], bins) if source_region is not None else None
        sample_bins = (_to_bins(values, array[keep], bins) if edges is None else np.clip(
            _binned(values, edges, bins), 0, bins - 1).astype(np.int64))
        return cls(points.astype(np.float32), sample_bins,
                   target_array, to_index, np.array(target.GetOrigin()), from_moving,
                   sampler, bins, max(1, int(threads)))

    def score(self, matrices: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Normalised mutual information of each fixed -> moving map ``x -> A x + b``
        (matrices (K, 3, 3), offsets (K, 3)); higher is better, -inf when fewer than
        ``MIN_OVERLAP`` of the samples overlap.

        Scored a few poses at a time, so that every per-sample array stays in the CPU cache.
        Each pose's score does not depend on the batch it is in, so the result is the same
        however the poses are split. With ``threads`` > 1, a score of at least
        ``_THREAD_CHUNK`` samples in all (poses times samples) is split into even batches of
        about that size, scored by that many threads of a shared pool; smaller ones run
        here.
        """
        n, count = len(self.points), len(matrices)
        if self.threads > 1 and count * n >= _THREAD_CHUNK // 2:
            batches = -(-count * n // _THREAD_CHUNK)
            batches = -(-batches // self.threads) * self.threads  # a multiple of the threads
            cuts = np.linspace(0, count, min(batches, count) + 1).astype(int)
            parts = _pool(self.threads).map(
                lambda bounds: self._score_batch(matrices[slice(*bounds)],
                                                 offsets[slice(*bounds)], _THREAD_CHUNK),
                itertools.pairwise(cuts))
            return np.concatenate(list(parts))
        per = max(1, _CHUNK // n)
        return np.concatenate([self._score_batch(matrices[k:k + per], offsets[k:k + per])
                               for k in range(0, count, per)])

    def _score_batch(self, matrices: np.ndarray, offsets: np.ndarray,
                     chunk: int | None = None) -> np.ndarray:
        count, n, bins = len(matrices), len(self.points), self.bins
        if self.from_moving:  # samples are moving points: apply the inverse maps
            matrices = np.linalg.inv(matrices)
            offsets = -np.einsum("kij,kj->ki", matrices, offsets)
        # Compose with physical -> target voxel index, rows as (z, y, x).
        to_index = self.to_index[::-1]
        total_matrix = np.einsum("ij,kjl->kil", to_index, matrices).astype(np.float32)
        total_offset = ((offsets - self.origin) @ to_index.T).astype(np.float32)
        index = _work("index", (3, count, n), np.float32)
        for axis in range(3):
            np.matmul(total_matrix[:, axis], self.points.T, out=index[axis])
            index[axis] += total_offset[:, axis, None]
        values, valid = self.sampler(index.reshape(3, -1), chunk, reuse=True)
        # Soft binning of the interpolated intensity (each sample split between its two
        # nearest bins): the score then changes smoothly with the pose, with no plateaus
        # for a compass search to stall on. Unusable samples weigh nothing. (Into work
        # arrays, as in the sampler.)
        m = count * n
        values = np.clip(values, 0.0, bins - 1.0, out=values)
        lower = _work("lower", (m,), np.int64)
        np.copyto(lower, values, casting="unsafe")
        np.minimum(lower, bins - 2, out=lower)
        upper_weight = np.subtract(values, lower, out=_work("upper weight", (m,), np.float64))
        upper_weight *= valid
        lower_weight = np.subtract(valid, upper_weight, out=_work("lower weight", (m,),
                                                                  np.float64))
        sample_base = np.multiply(self.sample_bins, bins, out=_work("sample base", (n,),
                                                                     np.int64))
        base = np.add(lower.reshape(count, n), sample_base,
                      out=_work("base", (count, n), np.int64))
        base += (np.arange(count) * (bins * bins))[:, None]
        base = base.reshape(-1)
        size = count * bins * bins
        joint = np.bincount(base, weights=lower_weight, minlength=size)
        base += 1
        joint += np.bincount(base, weights=upper_weight, minlength=size)
        joint = joint.reshape(count, bins, bins)
        total = joint.sum(axis=(1, 2))
        scores = np.full(count, -np.inf)
        ok = total >= MIN_OVERLAP * n
        if not ok.any():
            return scores
        p = joint[ok] / total[ok, None, None]
        scores[ok] = (_entropy(p.sum(axis=2)) + _entropy(p.sum(axis=1))) / _entropy(
            p.reshape(p.shape[0], -1))
        return scores

    def score_poses(self, poses: Poses, params: np.ndarray, chunk: int = 400) -> np.ndarray:
        """Scores of many poses (K, 6), in chunks to bound memory."""
        scores = []
        for start in range(0, len(params), chunk):
            matrices, offsets = poses.affine(params[start:start + chunk])
            scores.append(self.score(matrices, offsets))
        return np.concatenate(scores) if scores else np.empty(0)

    def score_transforms(self, transforms: Sequence[sitk.Transform]) -> np.ndarray:
        """Scores of linear SimpleITK transforms (for checks and diagnostics)."""
        pairs = [matrix_offset(t) for t in transforms]
        return self.score(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))


def _prepared_target(level: Level, target: sitk.Image, target_mask: sitk.Image | None,
                     target_region: np.ndarray | None, bins: int,
                     source_region: tuple[sitk.Image, np.ndarray | None],
                     from_moving: bool) -> tuple[np.ndarray, np.ndarray, LinearSampler]:
    """The scored image of ``level`` scaled to ``bins``, its physical-to-index matrix and
    its sampler (which holds the mask): built on first use, then shared through
    ``level.prepared``.

    The scale is linear over the image's range, unless a region of interest restricts the
    score: the target's own (``target_region``, a boolean array), or the samples' image's
    (``source_region``: that image and its region array, or None). Then the target is
    binned by the quantiles of its intensities in that region (the source's, read around
    its bounding box), so that what the region shows fills the bins; values beyond go to
    the outer bins.
    """
    key = ("search target", bins, from_moving)
    if key not in level.prepared:
        array = sitk.GetArrayFromImage(target).astype(np.float32)
        valid = None
        if target_mask is not None:
            valid = (sitk.GetArrayFromImage(target_mask) > 0).astype(np.float32)
        direction = np.array(target.GetDirection()).reshape(3, 3)
        to_index = np.linalg.inv(direction @ np.diag(target.GetSpacing()))
        edges = None
        if target_region is not None:
            edges = _quantile_edges(array[target_region], bins)
        elif source_region[1] is not None:
            edges = _quantile_edges(_around(array, target, *source_region), bins)
        scaled = _scale(array, bins) if edges is None else _binned(array, edges, bins)
        level.prepared[key] = (scaled, to_index, LinearSampler(scaled, valid))
    return level.prepared[key]


def _region(mask: sitk.Image | None, is_region: bool) -> np.ndarray | None:
    """A region-of-interest mask as a boolean [z, y, x] array (None for other masks)."""
    if mask is None or not is_region:
        return None
    return sitk.GetArrayFromImage(mask) > 0


def _scored_volume(image: sitk.Image, region: np.ndarray | None) -> float:
    """The physical volume an image is scored over: its region's, else the whole image's."""
    if region is None:
        return _volume(image)
    return float(region.sum() * np.prod(image.GetSpacing()))


def _around(array: np.ndarray, image: sitk.Image, source: sitk.Image,
            region: np.ndarray) -> np.ndarray:
    """``image``'s intensities (``array``) in the bounding box of ``source``'s ``region``,
    grown by ``AROUND_MM`` (both in one physical frame, as they are before a
    registration); the whole array if the region is empty or the box misses the image."""
    if not region.any():
        return array.ravel()
    index = np.argwhere(region)[:, ::-1]  # x, y, z
    low, high = index.min(axis=0), index.max(axis=0)
    corners = np.array([[(low, high)[c >> axis & 1][axis] for axis in range(3)]
                        for c in range(8)], dtype=float)
    source_direction = np.array(source.GetDirection()).reshape(3, 3)
    physical = (np.array(source.GetOrigin())
                + (corners * np.array(source.GetSpacing())) @ source_direction.T)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    to_index = np.linalg.inv(direction @ np.diag(image.GetSpacing()))
    mapped = (physical - np.array(image.GetOrigin())) @ to_index.T
    margin = AROUND_MM / np.array(image.GetSpacing())
    start = np.clip(np.floor(mapped.min(axis=0) - margin), 0, None).astype(int)
    stop = np.minimum(np.ceil(mapped.max(axis=0) + margin) + 1,
                      np.array(image.GetSize())).astype(int)
    if np.any(stop <= start):
        return array.ravel()
    return array[start[2]:stop[2], start[1]:stop[1], start[0]:stop[0]].ravel()


def _quantile_edges(values: np.ndarray, bins: int) -> np.ndarray | None:
    """Equal-frequency bin edges of ``values`` (fewer where values repeat); None when they
    have fewer than three distinct edges (a flat region: the linear scale then)."""
    if values.size == 0:
        return None
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)))
    return edges if len(edges) >= 3 else None


def _binned(values: np.ndarray, edges: np.ndarray, bins: int) -> np.ndarray:
    """``values`` on the continuous bin scale [0, bins) through the quantile ``edges``
    (piecewise linear between them; values beyond the outer edges go to the outer bins)."""
    scale = np.linspace(0.0, bins - 1e-3, len(edges))
    return np.interp(values, edges, scale).astype(np.float32)


def _volume(image: sitk.Image) -> float:
    return float(np.prod(np.array(image.GetSize()) * np.array(image.GetSpacing())))


def _entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy along the last axis (0 log 0 = 0)."""
    return -xlogy(p, p).sum(axis=-1)


def _scale(array: np.ndarray, bins: int) -> np.ndarray:
    low, high = float(array.min()), float(array.max())
    return ((array - low) / max(high - low, 1e-12) * (bins - 1e-3)).astype(np.float32)


def _to_bins(values: np.ndarray, reference: np.ndarray, bins: int) -> np.ndarray:
    low, high = float(reference.min()), float(reference.max())
    scaled = (values - low) / max(high - low, 1e-12) * (bins - 1e-3)
    return np.clip(scaled, 0, bins - 1).astype(np.int64)


def grid(base: np.ndarray, angle_rad: float, angle_steps: int, shift_mm: float,
         shift_steps: int) -> np.ndarray:
    """Poses on a joint grid around each row of ``base`` (B, 6): ``angle_steps`` rotations
    each way about every axis and ``shift_steps`` shifts each way along every axis."""
    angles = np.arange(-angle_steps, angle_steps + 1) * angle_rad
    shifts = np.arange(-shift_steps, shift_steps + 1) * shift_mm
    offsets = np.array(list(itertools.product(angles, angles, angles, shifts, shifts, shifts)))
    return (np.asarray(base)[:, None, :] + offsets[None]).reshape(-1, 6)


def best_scored(space: SearchSpace, poses: Poses, params: np.ndarray, keep: int) -> np.ndarray:
    """The ``keep`` rows of ``params`` that ``space`` scores best, best first."""
    return params[np.argsort(-space.score_poses(poses, params), kind="stable")[:keep]]


def best_distinct(params: np.ndarray, scores: np.ndarray, keep: int,
                  min_angle_deg: float = 6.0, min_shift_mm: float = 4.0,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The ``keep`` best-scored poses, skipping near-duplicates of better ones."""
    chosen: list[int] = []
    limit = math.radians(min_angle_deg)
    for k in np.argsort(-scores):
        if not math.isfinite(scores[k]):
            break
        if any(np.all(np.abs(params[k, :3] - params[j, :3]) < limit)
               and np.linalg.norm(params[k, 3:] - params[j, 3:]) < min_shift_mm
               for j in chosen):
            continue
        chosen.append(int(k))
        if len(chosen) == keep:
            break
    return params[chosen], scores[chosen]


def compass(space: SearchSpace, poses: Poses, params: np.ndarray, scores: np.ndarray, *,
            step_mm: float, min_step_mm: float, radius_mm: float = 50.0,
            iterations: int = 25, cancel: threading.Event | None = None,
            ) -> tuple[np.ndarray, np.ndarray]:
    """Compass search from every row of ``params`` at once: try a step each way along
    every parameter, move to the best that improves the score, halve the step when none
    does. Derivative-free, so a rough, noisy score cannot throw it off the way a gradient
    step can; rotation steps are the angle that moves a point ``radius_mm`` from the centre
    by the shift step. After a move, the step straight back (to the pose just left, known
    to score lower) is not scored again."""
    params, scores = params.copy(), scores.copy()
    steps = np.full(len(params), float(step_mm))
    came_from = np.full(len(params), -1)  # the direction back to the previous pose
    directions = np.concatenate([np.eye(6), -np.eye(6)])
    for _ in range(iterations):
        active = np.flatnonzero(steps >= min_step_mm)
        if len(active) == 0:
            break
        check_cancel(cancel, "the registration")
        moves = directions[None] * np.where(np.arange(6) < 3, 1.0 / radius_mm, 1.0)
        moves = moves * steps[active, None, None]
        candidates = params[active, None, :] + moves
        wanted = _not_back(came_from[active], len(directions))
        values = np.full(wanted.shape, -np.inf)
        values[wanted] = space.score_poses(poses, candidates[wanted])
        best = values.argmax(axis=1)
        better = values[np.arange(len(active)), best] > scores[active]
        for row, k in enumerate(active):
            if better[row]:
                params[k] = candidates[row, best[row]]
                scores[k] = values[row, best[row]]
                came_from[k] = (best[row] + len(directions) // 2) % len(directions)
            else:
                steps[k] /= 2
                came_from[k] = -1
    return params, scores


def _not_back(came_from: np.ndarray, count: int) -> np.ndarray:
    """(rows, count) mask of the compass directions worth scoring: all but the way back
    (``came_from``, -1 for none)."""
    wanted = np.ones((len(came_from), count), dtype=bool)
    rows = np.flatnonzero(came_from >= 0)
    wanted[rows, came_from[rows]] = False
    return wanted


def search_rigid_start(coarse: Level, fine: Level, centre: np.ndarray,
                       starts: Sequence[Sequence[float]], *,
                       moving_initial: sitk.Transform | None = None, shift_mm: float = 8.0,
                       angle_deg: float = 10.0, keep: int = 10, fine_keep: int = 3,
                       samples: int = 1000, fine_samples: int = 8000, seed: int = 0,
                       screen_samples: int | None = None, screen_keep: int = 300,
                       bins: int = BINS, edge_weighted: bool = True, threads: int = 1,
                       cancel: threading.Event | None = None,
                       ) -> list[tuple[float, sitk.Euler3DTransform]]:
    """Best rigid starting poses, best first (score: normalised MI on the ``fine`` level).

    Args:
        coarse, fine: two pyramid levels (e.g. 8 and 4 mm).
        centre: the centre of rotation (fixed space).
        starts: Euler parameters (angles, shift) of the starting poses.
        moving_initial: a linear fixed -> moving transform applied first.
        shift_mm, angle_deg: steps of the coarse joint grid (two shift steps and one angle
            step each way).
        keep: poses shortlisted from the grid and refined on the coarse level.
        fine_keep: of those, how many are refined again on the fine level.
        samples, fine_samples: metric samples on the two levels.
        screen_samples, screen_keep: when given (and fewer than ``samples``), every grid
            pose is first scored with this many samples and only the ``screen_keep`` best
            are scored again with ``samples`` (most of the grid is far off, and a cheap,
            noisier score tells that as well).
        bins, edge_weighted, threads: see :meth:`SearchSpace.from_level`.
    """
    initial = matrix_offset(moving_initial) if moving_initial is not None else None
    poses = Poses(np.asarray(centre, dtype=float), initial)
    space = SearchSpace.from_level(coarse, samples, seed, bins=bins, edge_weighted=edge_weighted,
                                   threads=threads)
    check_cancel(cancel, "the registration")
    candidates = grid(np.asarray(starts, dtype=float), math.radians(angle_deg), 1, shift_mm, 2)
    if screen_samples is not None and screen_samples < samples and len(candidates) > screen_keep:
        screen = SearchSpace.from_level(coarse, screen_samples, seed, bins=bins,
                                        edge_weighted=edge_weighted, threads=threads)
        candidates = best_scored(screen, poses, candidates, screen_keep)
    params, scores = best_distinct(candidates, space.score_poses(poses, candidates), keep)
    params, scores = compass(space, poses, params, scores, step_mm=shift_mm / 2,
                             min_step_mm=coarse.spacing_mm / 4, cancel=cancel)
    params, _ = best_distinct(params, scores, fine_keep)
    fine_space = SearchSpace.from_level(fine, fine_samples, seed, bins=bins,
                                        edge_weighted=edge_weighted, threads=threads)
    params, scores = compass(fine_space, poses, params, fine_space.score_poses(poses, params),
                             step_mm=fine.spacing_mm, min_step_mm=fine.spacing_mm / 8,
                             cancel=cancel)
    order = np.argsort(-scores)
    return [(float(scores[k]), poses.transform(params[k])) for k in order]


def compass_affine(space: SearchSpace, matrix: np.ndarray, centre: np.ndarray,
                   translation: np.ndarray, *, step_mm: float, min_step_mm: float,
                   radius_mm: float = 50.0, iterations: int = 40,
                   initial: tuple[np.ndarray, np.ndarray] | None = None,
                   cancel: threading.Event | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """Compass search over the 12 parameters of ``x -> M (x - c) + c + t``: matrix entries
    step by ``step / radius_mm`` (a ``step`` mm move ``radius_mm`` from the centre), the
    shift by ``step`` mm. Returns the matrix, the translation and the score."""

    def maps(matrices: np.ndarray, shifts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        offsets = centre + shifts - matrices @ centre
        if initial is not None:
            outer, outer_offset = initial
            return outer @ matrices, offsets @ outer.T + outer_offset
        return matrices, offsets

    best = float(space.score(*maps(matrix[None], translation[None]))[0])
    step = float(step_mm)
    came_from = -1  # the direction back to the previous pose, not scored again
    for _ in range(iterations):
        if step < min_step_mm:
            break
        check_cancel(cancel, "the registration")
        matrices, shifts = [], []
        for sign in (1.0, -1.0):
            for entry in range(9):
                moved = matrix.copy()
                moved.flat[entry] += sign * step / radius_mm
                matrices.append(moved)
                shifts.append(translation)
            for axis in range(3):
                moved_shift = translation.copy()
                moved_shift[axis] += sign * step
                matrices.append(matrix)
                shifts.append(moved_shift)
        wanted = _not_back(np.array([came_from]), len(matrices))[0]
        values = np.full(len(matrices), -np.inf)
        values[wanted] = space.score(*maps(np.array(matrices)[wanted], np.array(shifts)[wanted]))
        k = int(np.argmax(values))
        if values[k] > best:
            matrix, translation, best = matrices[k], shifts[k], float(values[k])
            came_from = (k + len(matrices) // 2) % len(matrices)
        else:
            step /= 2
            came_from = -1
    return matrix, translation, best
