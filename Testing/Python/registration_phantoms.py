"""An analytic phantom for registration tests: nested ellipsoids, sampled on any grid through
any transform, in two "modalities" that give each tissue a different, non-monotonic
intensity (so only a cross-modal metric can align them); and a record of the threads the
search scores on."""

from __future__ import annotations

import math
import threading

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter
from synthetic import make_image, physical_points

# (centre mm, radii mm, label); later shapes are drawn over earlier ones. Off-centre and of
# different sizes so that no rotation or mirror maps the phantom onto itself.
SHAPES = [
    ((0.0, 0.0, 0.0), (40.0, 32.0, 36.0), 1),
    ((-14.0, 8.0, 6.0), (11.0, 9.0, 13.0), 2),
    ((16.0, -6.0, -9.0), (8.0, 12.0, 8.0), 3),
    ((4.0, 15.0, -14.0), (6.0, 5.0, 7.0), 4),
    ((-6.0, -16.0, 15.0), (7.0, 6.0, 5.0), 2),
]
# Intensity of labels 0..4 in each modality: "CT" rises with the label, "MR" is scrambled.
INTENSITIES = {
    "CT": np.array([0.0, 40.0, 80.0, 130.0, 200.0]),
    "MR": np.array([5.0, 160.0, 60.0, 220.0, 20.0]),
}


def labels_at(points: np.ndarray) -> np.ndarray:
    """Tissue label (0..4) at physical points (..., 3)."""
    labels = np.zeros(points.shape[:-1], np.int64)
    for centre, radii, label in SHAPES:
        inside = (((points - np.array(centre)) / np.array(radii)) ** 2).sum(-1) <= 1.0
        labels[inside] = label
    return labels


def phantom(
    modality: str = "CT",
    size: tuple[int, int, int] = (44, 40, 36),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.5),
    transform: sitk.Transform | None = None,
    noise: float = 2.0,
    seed: int = 0,
) -> sitk.Image:
    """The phantom in ``modality`` on a grid centred on the origin.

    With ``transform`` (a perturbation ``P``), the image shows at ``y`` what the phantom has
    at ``P(y)``, so the true fixed -> this image transform is ``P^-1``.
    """
    origin = -(np.array(size) - 1) * np.array(spacing) / 2
    grid = make_image(np.zeros(size[::-1], np.float32), spacing, tuple(origin))
    points = physical_points(grid)
    if transform is not None:
        flat = points.reshape(-1, 3)
        points = np.array([transform.TransformPoint(tuple(p)) for p in flat]).reshape(
            points.shape)
    values = INTENSITIES[modality][labels_at(points)]
    values = gaussian_filter(values, 0.8)
    values += np.random.default_rng(seed).normal(0, noise, values.shape)
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.CopyInformation(grid)
    return image


def inner_points(step: int = 6) -> np.ndarray:
    """Physical points inside the phantom's body, for measuring registration error."""
    axes = [np.arange(-30.0, 31.0, step)] * 3
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return points[labels_at(points) > 0]


def registration_error(found: sitk.Transform, truth_points: np.ndarray,
                       points: np.ndarray) -> np.ndarray:
    """Distance (mm) between where ``found`` sends ``points`` and where they truly go."""
    mapped = np.array([found.TransformPoint(tuple(p)) for p in points])
    return np.linalg.norm(mapped - truth_points, axis=1)


def rigid(angles_deg, shift_mm) -> sitk.Euler3DTransform:
    """A rigid transform from Euler angles (degrees, about x, y, z) and a shift (mm)."""
    transform = sitk.Euler3DTransform()
    transform.SetRotation(*(math.radians(a) for a in angles_deg))
    transform.SetTranslation(shift_mm)
    return transform


def record_scoring_threads(monkeypatch) -> list[str]:
    """The names of the threads that score each batch of the search's poses from now on
    (the list fills as the code under test runs)."""
    from MultiModalAnalysisLib.registration import search

    names: list[str] = []
    score_batch = search.SearchSpace._score_batch

    def spy(self, *args):
        names.append(threading.current_thread().name)
        return score_batch(self, *args)

    monkeypatch.setattr(search.SearchSpace, "_score_batch", spy)
    return names
