"""Quality-control figure of a registration: checkerboard and edge overlay of the fixed image
and the moving image on the fixed grid, before and after registration."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.plots import VIEWS, _aspect, _lps_array, _slice, _style

CHECKER_MM = 20.0


def _unit(array: np.ndarray) -> np.ndarray:
    """Intensities to [0, 1] by the 1st/99th percentiles (robust to outliers)."""
    low, high = np.percentile(array, [1, 99])
    return np.clip((array - low) / (high - low if high > low else 1.0), 0, 1)


def _edges(array: np.ndarray) -> np.ndarray:
    """A boolean edge map: the strongest 8% of gradient magnitudes of a [0, 1] slice."""
    from scipy.ndimage import gaussian_filter, sobel

    smooth = gaussian_filter(array, 1.0)
    magnitude = np.hypot(sobel(smooth, 0), sobel(smooth, 1))
    return magnitude > np.percentile(magnitude, 92)


def _checkerboard(a: np.ndarray, b: np.ndarray, square: Sequence[float]) -> np.ndarray:
    rows = (np.arange(a.shape[0]) // max(1, int(square[0])))[:, None]
    cols = (np.arange(a.shape[1]) // max(1, int(square[1])))[None, :]
    return np.where((rows + cols) % 2 == 0, a, b)


def registration_qc_figure(
    fixed: sitk.Image,
    before: sitk.Image,
    after: sitk.Image,
    path: str | Path,
    *,
    centre_mm: Sequence[float] | None = None,
    title: str = "",
    valid_before: sitk.Image | None = None,
    valid_after: sitk.Image | None = None,
) -> Path:
    """Write a PNG: rows = checkerboard before/after and edge overlay before/after; columns =
    axial, coronal and sagittal slices through ``centre_mm`` (the fixed image's centre by
    default).

    Args:
        fixed: the fixed image.
        before, after: the moving image resampled on the fixed grid before (initial
            transform) and after registration.
        path: the PNG to write.
        centre_mm: the physical point the slices pass through.
        title: figure title.
        valid_before, valid_after: where the moving image has data on the fixed grid; edges
            are only drawn there (not along the border of its field of view).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if centre_mm is None:
        centre_mm = fixed.TransformContinuousIndexToPhysicalPoint(
            [(s - 1) / 2 for s in fixed.GetSize()])
    oriented = sitk.DICOMOrient(fixed, "LPS")
    index = oriented.TransformPhysicalPointToIndex([float(c) for c in centre_mm])
    index = [int(np.clip(i, 0, s - 1)) for i, s in zip(index, oriented.GetSize(), strict=True)]
    arrays = {}
    for name, image in (("fixed", fixed), ("before", before), ("after", after),
                        ("valid_before", valid_before), ("valid_after", valid_after)):
        if image is None:
            continue
        array, spacing = _lps_array(sitk.Cast(image, sitk.sitkFloat32))
        arrays[name] = array
    fig, axes = plt.subplots(4, 3, figsize=(10.5, 13.2), squeeze=False)
    fig.patch.set_facecolor("black")
    for col, view in enumerate(VIEWS):
        aspect = _aspect(view, spacing)
        fixed_slice = _unit(_slice(arrays["fixed"], view, index))
        square = (CHECKER_MM / spacing[2 if view != "axial" else 1],
                  CHECKER_MM / spacing[0 if view != "sagittal" else 1])
        for row, stage in enumerate(("before", "after")):
            moving_slice = _unit(_slice(arrays[stage], view, index))
            ax = axes[row, col]
            ax.imshow(_checkerboard(fixed_slice, moving_slice, square), cmap="gray",
                      aspect=aspect, interpolation="bilinear")
            _style(ax, f"checkerboard {stage} - {view}")
            ax = axes[2 + row, col]
            ax.imshow(fixed_slice, cmap="gray", aspect=aspect, interpolation="bilinear")
            drawn = _edges(moving_slice)
            if f"valid_{stage}" in arrays:
                drawn &= _slice(arrays[f"valid_{stage}"], view, index) > 0.5
            edges = np.ma.masked_where(~drawn, np.ones_like(moving_slice))
            ax.imshow(edges, cmap="autumn", vmin=0, vmax=1, aspect=aspect,
                      interpolation="nearest", alpha=0.9)
            _style(ax, f"moving edges on fixed, {stage} - {view}")
    if title:
        fig.suptitle(title, color="white")
    fig.tight_layout(rect=(0, 0, 1, 0.97 if title else 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, facecolor=fig.get_facecolor())
    plt.close(fig)
    return path
