"""Registration from paired landmarks (points a clinician clicks in both images)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError, MMAError

LANDMARK_TRANSFORMS = ("rigid", "similarity", "affine")
_MINIMUM_POINTS = {"rigid": 3, "similarity": 3, "affine": 4}


def validate_landmarks(
    fixed_points: Sequence[Sequence[float]], moving_points: Sequence[Sequence[float]]
) -> tuple[np.ndarray, np.ndarray]:
    """Both point lists as N x 3 float arrays, checked to pair up.

    Raises:
        MMAError: no points, wrong shape, different counts, non-numeric or non-finite
            coordinates.
    """
    try:
        fixed = np.asarray(fixed_points, dtype=float)
        moving = np.asarray(moving_points, dtype=float)
    except (TypeError, ValueError):
        raise MMAError("the landmarks must be numbers: (x, y, z) points in mm.") from None
    if fixed.size == 0 or moving.size == 0:
        raise MMAError("no landmark pairs were given: give at least one pair (three or more "
                       "to start a registration from them).")
    for name, points in (("fixed", fixed), ("moving", moving)):
        if points.ndim != 2 or points.shape[1] != 3:
            raise MMAError(
                f"the {name} landmarks must be a list of (x, y, z) points in mm, got an array "
                f"of shape {points.shape}."
            )
        if not np.isfinite(points).all():
            raise MMAError(f"the {name} landmarks hold NaN or infinite coordinates.")
    if len(fixed) != len(moving):
        raise MMAError(
            f"{len(fixed)} fixed landmarks but {len(moving)} moving ones: landmarks must come "
            "in pairs (the same anatomical point clicked in both images, in the same order)."
        )
    return fixed, moving


def register_landmarks(
    fixed_points: Sequence[Sequence[float]],
    moving_points: Sequence[Sequence[float]],
    transform: str = "rigid",
) -> sitk.Transform:
    """The least-squares transform taking each fixed landmark onto its moving partner.

    Args:
        fixed_points: N points (x, y, z) in mm in the fixed image's physical (LPS) space.
        moving_points: the same N anatomical points in the moving image's space.
        transform: "rigid" (>= 3 points), "similarity" (rigid + one scale, >= 3) or
            "affine" (>= 4 points, not all in one plane).

    Returns:
        A SimpleITK transform mapping fixed points to moving points (ITK convention), usable
        on its own or as ``register(..., initial_transform=...)``.

    Raises:
        ConfigError: unknown transform type.
        MMAError: too few points, points that do not pair up, or collinear/coplanar points
            that leave the transform undetermined.
    """
    kind = str(transform).lower()
    if kind not in LANDMARK_TRANSFORMS:
        raise ConfigError(
            f"unknown landmark transform '{transform}': use one of "
            f"{', '.join(LANDMARK_TRANSFORMS)}."
        )
    fixed, moving = validate_landmarks(fixed_points, moving_points)
    needed = _MINIMUM_POINTS[kind]
    if len(fixed) < needed:
        raise MMAError(
            f"a {kind} landmark registration needs at least {needed} point pairs, got "
            f"{len(fixed)}. Click more landmarks in both images."
        )
    _require_spread(fixed, kind, "fixed")
    _require_spread(moving, kind, "moving")
    initial = {
        "rigid": sitk.VersorRigid3DTransform(),
        "similarity": sitk.Similarity3DTransform(),
        "affine": sitk.AffineTransform(3),
    }[kind]
    result = sitk.LandmarkBasedTransformInitializer(
        initial, fixed.ravel().tolist(), moving.ravel().tolist()
    )
    return {
        "rigid": sitk.VersorRigid3DTransform,
        "similarity": sitk.Similarity3DTransform,
        "affine": sitk.AffineTransform,
    }[kind](result)


def _require_spread(points: np.ndarray, kind: str, name: str) -> None:
    """Refuse point sets that do not pin the transform down (all on a line or a plane)."""
    centred = points - points.mean(axis=0)
    singular = np.linalg.svd(centred, compute_uv=False)
    scale = max(singular[0], 1e-9)
    if singular[1] / scale < 1e-3:
        raise MMAError(
            f"the {name} landmarks all lie on one line: rotations about that line are "
            "undetermined. Add a landmark away from the line."
        )
    if kind == "affine" and singular[2] / scale < 1e-3:
        raise MMAError(
            f"the {name} landmarks all lie in one plane: an affine transform is undetermined "
            "out of that plane. Add a landmark off the plane, or use a rigid transform."
        )


def read_landmarks_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Paired landmarks from a CSV with columns ``fixed_x, fixed_y, fixed_z, moving_x,
    moving_y, moving_z`` (LPS mm, one pair per row; other columns are ignored).

    Raises:
        MMAError: unreadable file or missing columns.
    """
    import pandas as pd

    path = Path(path)
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise MMAError(f"could not read landmarks from {path}: {error}") from None
    columns = [f"{side}_{axis}" for side in ("fixed", "moving") for axis in "xyz"]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise MMAError(
            f"{path} lacks the landmark columns {', '.join(missing)} (expected "
            f"{', '.join(columns)}, coordinates in LPS mm)."
        )
    if table.empty:
        raise MMAError(f"{path} holds no landmark pairs (only its header): add one row per "
                       "pair of points.")
    numbers = table[columns].apply(pd.to_numeric, errors="coerce")
    bad = numbers.isna() & table[columns].notna()
    if bad.any().any():
        row, column = np.argwhere(bad.to_numpy())[0]
        raise MMAError(
            f"{path}: row {row + 1}, column {columns[column]} holds "
            f"{table[columns].iat[row, column]!r}, not a number (coordinates in LPS mm).")
    values = numbers.to_numpy(dtype=float)
    return validate_landmarks(values[:, :3], values[:, 3:])
