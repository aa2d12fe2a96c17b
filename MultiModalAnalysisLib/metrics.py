"""Quality metrics shared by registration, segmentation and their benchmarks: overlap
(Dice), surface distance (HD95), target registration error, and the Jacobian determinant
of a transform (folding)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import EmptyImageError, GeometryError
from MultiModalAnalysisLib.images import same_grid


def _binary(mask: sitk.Image) -> sitk.Image:
    return sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8)


def _require_same_grid(a: sitk.Image, b: sitk.Image, what: str) -> None:
    if not same_grid(a, b):
        raise GeometryError(
            f"{what}: the two masks are on different grids; resample one onto the other "
            "(nearest neighbour) first."
        )


def dice(a: sitk.Image, b: sitk.Image) -> float:
    """Dice overlap of the non-zero voxels of two masks on one grid (1.0 when both empty)."""
    _require_same_grid(a, b, "Dice")
    x = sitk.GetArrayViewFromImage(a) != 0
    y = sitk.GetArrayViewFromImage(b) != 0
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(x, y).sum()) / total


def surface_distances(a: sitk.Image, b: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``a`` to ``b``'s surface, and back.

    Raises:
        EmptyImageError: either mask is empty (a surface distance is undefined).
    """
    _require_same_grid(a, b, "surface distance")
    a, b = _binary(a), _binary(b)
    for mask, label in ((a, "first"), (b, "second")):
        if not sitk.GetArrayViewFromImage(mask).any():
            raise EmptyImageError(f"the {label} mask is empty: surface distances are undefined.")

    def from_surface(source: sitk.Image, target: sitk.Image) -> np.ndarray:
        distance = sitk.Abs(
            sitk.SignedMaurerDistanceMap(target, insideIsPositive=False, squaredDistance=False,
                                         useImageSpacing=True)
        )
        contour = sitk.LabelContour(source, fullyConnected=False)
        return sitk.GetArrayViewFromImage(distance)[sitk.GetArrayViewFromImage(contour) > 0]

    return from_surface(a, b), from_surface(b, a)


def hausdorff_95(a: sitk.Image, b: sitk.Image) -> float:
    """95th-percentile symmetric Hausdorff distance (mm) between two masks' surfaces."""
    ab, ba = surface_distances(a, b)
    return float(np.percentile(np.concatenate([ab, ba]), 95))


def mean_surface_distance(a: sitk.Image, b: sitk.Image) -> float:
    """Mean symmetric surface distance (mm)."""
    ab, ba = surface_distances(a, b)
    return float(np.concatenate([ab, ba]).mean())


def target_registration_error(
    transform: sitk.Transform,
    fixed_points: Sequence[Sequence[float]],
    moving_points: Sequence[Sequence[float]],
) -> np.ndarray:
    """Per-point distance (mm) between ``transform(fixed_point)`` and its true moving point.

    The transform follows the ITK convention (fixed physical point -> moving physical point).
    """
    fixed = np.asarray(fixed_points, dtype=float)
    moving = np.asarray(moving_points, dtype=float)
    if fixed.shape != moving.shape or fixed.ndim != 2 or fixed.shape[1] != 3:
        raise ValueError("fixed_points and moving_points must both be N x 3 arrays.")
    mapped = np.array([transform.TransformPoint(tuple(map(float, p))) for p in fixed])
    return np.linalg.norm(mapped - moving, axis=1)


def transform_distance(
    a: sitk.Transform, b: sitk.Transform, points: Sequence[Sequence[float]]
) -> np.ndarray:
    """Per-point distance (mm) between where two transforms send the same points."""
    pts = np.asarray(points, dtype=float)
    pa = np.array([a.TransformPoint(tuple(map(float, p))) for p in pts])
    pb = np.array([b.TransformPoint(tuple(map(float, p))) for p in pts])
    return np.linalg.norm(pa - pb, axis=1)


def jacobian_determinant(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """Jacobian determinant of ``transform`` sampled on ``reference``'s grid (float32).

    The transform becomes a displacement field u on the grid; the determinant of
    ``I + du/dx`` uses central differences inside and one-sided ones on the border (SimpleITK's
    filter halves the border derivatives), with derivatives taken in physical space so
    oblique, anisotropic grids are handled. Values <= 0 mark folding.
    """
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(reference)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    field = sitk.GetArrayFromImage(to_field.Execute(transform))  # [z, y, x, 3]
    return jacobian_of_displacement(field, reference)


def jacobian_of_displacement(field_zyx3: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Jacobian determinant of a displacement-field array ``[z, y, x, 3]`` (physical mm
    components) on ``reference``'s grid."""
    direction = np.array(reference.GetDirection(), dtype=float).reshape(3, 3)
    to_index = np.linalg.inv(direction @ np.diag(reference.GetSpacing()))
    field = field_zyx3.astype(np.float32, copy=False)
    # d u_c / d index_b for index axes b = x, y, z (array axes 2, 1, 0).
    d_index = [[np.gradient(field[..., c], axis=2 - b) for b in range(3)] for c in range(3)]
    # Chain rule to physical derivatives, plus the identity: J[c][a] = d(x + u)_c / d x_a.
    jac = [
        [
            sum(d_index[c][b] * np.float32(to_index[b, a]) for b in range(3)) + (c == a)
            for a in range(3)
        ]
        for c in range(3)
    ]
    det = (
        jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
        - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
        + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
    )
    image = sitk.GetImageFromArray(det.astype(np.float32))
    image.CopyInformation(reference)
    return image


def folding_statistics(
    jacobian: sitk.Image, mask: sitk.Image | None = None
) -> dict[str, float]:
    """Minimum, maximum and % of folded voxels (det <= 0) of a Jacobian-determinant image."""
    values = sitk.GetArrayViewFromImage(jacobian)
    if mask is not None:
        _require_same_grid(jacobian, mask, "folding statistics")
        values = values[sitk.GetArrayViewFromImage(mask) != 0]
    values = np.asarray(values).ravel()
    return {
        "jacobian_min": float(values.min()),
        "jacobian_max": float(values.max()),
        "folding_percent": float(100.0 * np.mean(values <= 0)),
    }


# ---------------------------------------------------------------------------------------
# Classification metrics (used by classification/ and its benchmark)
# ---------------------------------------------------------------------------------------


def _binary_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    values = np.unique(y)
    if not set(values.tolist()) <= {0, 1}:
        raise ValueError(f"labels must be 0/1, got values {values[:5].tolist()}.")
    return y.astype(bool)


def roc_auc(labels: Sequence[int] | np.ndarray, scores: np.ndarray) -> float | np.ndarray:
    """Area under the ROC curve of ``scores`` for 0/1 ``labels`` (ties count one half).

    ``scores`` may carry leading axes (e.g. [repeat, bootstrap, case]); the AUC is computed
    along the last one. This is the Mann-Whitney U statistic from average ranks: unlike
    ``sklearn.metrics.roc_auc_score`` it is vectorised over those axes, which makes a
    bootstrap over thousands of replicates and several CV repeats a single call.

    Raises:
        ValueError: ``labels`` hold a single class (the AUC is undefined).
    """
    from scipy.stats import rankdata

    y = _binary_labels(labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("the AUC needs both classes among the labels.")
    scores = np.asarray(scores, dtype=float)
    ranks = rankdata(scores, axis=-1)
    u = ranks[..., y].sum(axis=-1) - n_pos * (n_pos + 1) / 2.0
    auc = u / (n_pos * n_neg)
    return float(auc) if np.ndim(auc) == 0 else auc


def bootstrap_auc(
    labels: Sequence[int] | np.ndarray,
    scores: np.ndarray,
    *,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, np.ndarray]:
    """Percentile bootstrap confidence interval of the AUC, resampling cases.

    Cases are drawn with replacement within each class (stratified), so every replicate
    holds both classes in the original numbers. ``scores`` of shape [repeat, case] (one row
    per cross-validation repeat) give the interval of the AUC averaged over repeats.

    Returns:
        (lower, upper, replicates): the interval and the replicate AUCs.
    """
    y = _binary_labels(labels)
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(y), np.flatnonzero(~y)
    draws = np.concatenate(
        [
            rng.choice(positives, size=(n_bootstrap, positives.size)),
            rng.choice(negatives, size=(n_bootstrap, negatives.size)),
        ],
        axis=1,
    )
    resampled_labels = np.r_[np.ones(positives.size, int), np.zeros(negatives.size, int)]
    replicates = roc_auc(resampled_labels, scores[:, draws]).mean(axis=0)  # [bootstrap]
    alpha = (1.0 - confidence) / 2.0
    lower, upper = np.quantile(replicates, [alpha, 1.0 - alpha])
    return float(lower), float(upper), replicates


def confusion_counts(
    labels: Sequence[int] | np.ndarray, predicted: Sequence[int] | np.ndarray
) -> dict[str, int]:
    """True/false positives and negatives of 0/1 predictions."""
    y = _binary_labels(labels)
    p = _binary_labels(predicted)
    if y.shape != p.shape:
        raise ValueError("labels and predicted must have the same length.")
    return {
        "tn": int(np.sum(~y & ~p)),
        "fp": int(np.sum(~y & p)),
        "fn": int(np.sum(y & ~p)),
        "tp": int(np.sum(y & p)),
    }


def binary_classification_metrics(
    labels: Sequence[int] | np.ndarray, predicted: Sequence[int] | np.ndarray
) -> dict[str, float]:
    """Sensitivity, specificity, balanced accuracy, precision, F1 and accuracy.

    A ratio whose denominator is zero (e.g. precision with no positive prediction) is 0,
    as in scikit-learn's ``zero_division=0``.
    """
    c = confusion_counts(labels, predicted)

    def ratio(num: int, den: int) -> float:
        return num / den if den else 0.0

    sensitivity = ratio(c["tp"], c["tp"] + c["fn"])
    specificity = ratio(c["tn"], c["tn"] + c["fp"])
    precision = ratio(c["tp"], c["tp"] + c["fp"])
    return {
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": (sensitivity + specificity) / 2.0,
        "precision": precision,
        "f1": ratio(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"]),
        "accuracy": ratio(c["tp"] + c["tn"], sum(c.values())),
    }
