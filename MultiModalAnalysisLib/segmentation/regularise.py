"""Spatial regularisation of voxel-wise class probabilities, so a label map is not
salt-and-pepper: Gaussian smoothing of the posteriors, or iterated conditional modes (ICM)
on a Potts Markov random field.

Both are a few lines of numpy/scipy on the whole volume at once; no maintained library
offers a 3-D, mask-aware, anisotropic Potts ICM, hence our own.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from MultiModalAnalysisLib.progress import check_cancel


def smooth_probabilities(
    probabilities: np.ndarray,
    region: np.ndarray,
    spacing_zyx: Sequence[float],
    sigma_mm: float,
) -> np.ndarray:
    """Gaussian-smooth each class's probability map inside ``region`` and renormalise.

    The smoothing is normalised by the smoothed region, so voxels near the region's edge are
    not pulled towards the (empty) outside.

    Args:
        probabilities: ``[class, z, y, x]``, summing to 1 over classes inside the region.
        region: boolean ``[z, y, x]``; probabilities outside it are returned as 0.
        spacing_zyx: voxel size in mm along z, y, x.
        sigma_mm: Gaussian standard deviation in mm (0: no smoothing).
    """
    if sigma_mm <= 0:
        return probabilities
    sigma = [sigma_mm / s for s in spacing_zyx]
    weight = ndimage.gaussian_filter(region.astype(np.float32), sigma)
    smoothed = np.empty_like(probabilities, dtype=np.float32)
    for k, plane in enumerate(probabilities):
        smoothed[k] = ndimage.gaussian_filter((plane * region).astype(np.float32), sigma)
    smoothed /= np.maximum(weight, 1e-6)[None]
    smoothed /= np.maximum(smoothed.sum(axis=0, keepdims=True), 1e-12)
    smoothed *= region[None]
    return smoothed


def _neighbour_kernel(spacing_zyx: Sequence[float]) -> np.ndarray:
    """6-neighbourhood weights, smaller across thick slices (weight = finest spacing / spacing)."""
    finest = min(spacing_zyx)
    kernel = np.zeros((3, 3, 3), np.float32)
    for axis, step in enumerate(spacing_zyx):
        for side in (0, 2):
            index = [1, 1, 1]
            index[axis] = side
            kernel[tuple(index)] = finest / step
    return kernel


def icm(
    log_probabilities: np.ndarray,
    region: np.ndarray,
    spacing_zyx: Sequence[float],
    beta: float = 1.0,
    iterations: int = 5,
    cancel: threading.Event | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Iterated conditional modes on a Potts MRF.

    Each voxel takes the class maximising ``log p(class | intensities) + beta * (weighted
    number of neighbours in that class)``, all voxels updated together, ``iterations`` times
    (stopping early when nothing changes).

    Args:
        log_probabilities: ``[class, z, y, x]`` voxel-wise log posteriors.
        region: boolean ``[z, y, x]``: voxels outside take no part and get class -1.
        spacing_zyx: voxel size in mm, for the neighbour weights.
        beta: strength of the smoothness prior (0: plain maximum a posteriori).
        iterations: at most this many sweeps.
        cancel: stops between sweeps when set (``OperationCancelled``).

    Returns:
        ``(classes, probabilities)``: class index per voxel (-1 outside the region) and the
        local posteriors ``softmax(log p + beta * neighbours)`` of the last sweep.
    """
    classes = np.where(region, log_probabilities.argmax(axis=0), -1)
    energy = log_probabilities
    if beta > 0:
        kernel = _neighbour_kernel(spacing_zyx)
        for _ in range(max(int(iterations), 0)):
            check_cancel(cancel, "regularisation")
            neighbours = np.stack([
                ndimage.correlate((classes == k).astype(np.float32), kernel, mode="constant")
                for k in range(log_probabilities.shape[0])
            ])
            energy = log_probabilities + beta * neighbours
            updated = np.where(region, energy.argmax(axis=0), -1)
            changed = np.count_nonzero(updated != classes)
            classes = updated
            if changed == 0:
                break
    shifted = energy - energy.max(axis=0, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=0, keepdims=True)
    probabilities *= region[None]
    return classes, probabilities.astype(np.float32)
