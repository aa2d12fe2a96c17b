"""Figures: orthogonal-slice montages of co-registered volumes with overlays and contours.

Slices are shown in radiological convention (patient left on screen right, anterior up in
axial, superior up in coronal and sagittal) whatever the image direction, with the true
aspect ratio of the voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.images import same_grid
from MultiModalAnalysisLib.modalities import modality_family
from MultiModalAnalysisLib.preprocess.resample import resample_to_reference

VIEWS = ("axial", "coronal", "sagittal")


@dataclass
class Contour:
    """A mask outline drawn on every panel."""

    mask: sitk.Image
    label: str
    color: str = "lime"


@dataclass
class Overlay:
    """A colour image blended over a grey base image (e.g. PET on CT)."""

    base: sitk.Image
    overlay: sitk.Image
    title: str
    base_modality: str = "CT"
    overlay_modality: str = "PET"
    colormap: str = "hot"


def _lps_array(image: sitk.Image) -> tuple[np.ndarray, tuple[float, float, float]]:
    oriented = sitk.DICOMOrient(image, "LPS")
    return sitk.GetArrayFromImage(oriented), oriented.GetSpacing()


def _slice(array: np.ndarray, view: str, index: Sequence[int]) -> np.ndarray:
    i, j, k = index  # x, y, z voxel indices on the LPS-oriented grid
    if view == "axial":
        return array[k]  # rows: y (anterior at top), columns: x (patient right on the left)
    if view == "coronal":
        return array[:, j, :][::-1]  # rows: z flipped so superior is up
    return array[:, :, i][::-1]  # sagittal: columns: y (anterior on the left)


def _aspect(view: str, spacing: Sequence[float]) -> float:
    sx, sy, sz = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[view]


def display_range(image: sitk.Image, modality: str) -> tuple[float, float]:
    """Grey-level window for showing an image of ``modality``."""
    array = sitk.GetArrayViewFromImage(image)
    if modality_family(modality) == "CT" and array.min() < -100:
        return -160.0, 240.0  # soft-tissue window
    if modality_family(modality) == "PET":
        return 0.0, float(np.percentile(array, 99.8)) or 1.0
    low, high = np.percentile(array, [1, 99.5])
    return float(low), float(high if high > low else low + 1)


def orthogonal_montage(
    images: dict[str, sitk.Image],
    centre_mm: Sequence[float],
    path: str | Path,
    *,
    overlays: Sequence[Overlay] = (),
    contours: Sequence[Contour] = (),
    title: str = "",
) -> Path:
    """Write a PNG: one row per image (and per overlay), axial/coronal/sagittal columns
    through ``centre_mm``, with mask contours on every panel.

    Args:
        images: modality name -> image; the first image's grid is the display grid (others,
            overlays and contours are resampled onto it when they are on another grid).
        centre_mm: the physical point (LPS, mm) the three planes go through.
        path: the PNG to write (parent folders are created).
        overlays: colour overlays, each a row.
        contours: mask outlines drawn on every panel.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(images)
    grid = images[names[0]]

    def on_grid(image: sitk.Image, label: bool = False) -> sitk.Image:
        if same_grid(image, grid):
            return image
        return resample_to_reference(image, grid, is_label=label)

    oriented_grid = sitk.DICOMOrient(grid, "LPS")
    index = oriented_grid.TransformPhysicalPointToIndex([float(c) for c in centre_mm])
    size = oriented_grid.GetSize()
    index = [int(np.clip(v, 0, s - 1)) for v, s in zip(index, size, strict=True)]
    contour_arrays = [(_lps_array(on_grid(c.mask, True))[0], c) for c in contours]

    rows = len(names) + len(overlays)
    fig, axes = plt.subplots(rows, 3, figsize=(10.5, 3.3 * rows), squeeze=False)
    fig.patch.set_facecolor("black")

    def draw_contours(ax, view: str) -> None:
        for array, contour in contour_arrays:
            plane = _slice(array, view, index)
            if plane.any():
                ax.contour(plane > 0, levels=[0.5], colors=contour.color, linewidths=1.0)

    for row, name in enumerate(names):
        array, spacing = _lps_array(on_grid(images[name]))
        low, high = display_range(images[name], name)
        for col, view in enumerate(VIEWS):
            ax = axes[row, col]
            ax.imshow(_slice(array, view, index), cmap="gray", vmin=low, vmax=high,
                      aspect=_aspect(view, spacing), interpolation="bilinear")
            draw_contours(ax, view)
            _style(ax, f"{name} - {view}")

    for offset, overlay in enumerate(overlays):
        row = len(names) + offset
        base, spacing = _lps_array(on_grid(overlay.base))
        top, _ = _lps_array(on_grid(overlay.overlay))
        b_low, b_high = display_range(overlay.base, overlay.base_modality)
        o_low, o_high = display_range(overlay.overlay, overlay.overlay_modality)
        for col, view in enumerate(VIEWS):
            ax = axes[row, col]
            aspect = _aspect(view, spacing)
            ax.imshow(_slice(base, view, index), cmap="gray", vmin=b_low, vmax=b_high,
                      aspect=aspect, interpolation="bilinear")
            plane = _slice(top, view, index)
            shown = np.ma.masked_less(plane, o_low + 0.1 * (o_high - o_low))
            ax.imshow(shown, cmap=overlay.colormap, vmin=o_low, vmax=o_high, alpha=0.55,
                      aspect=aspect, interpolation="bilinear")
            draw_contours(ax, view)
            _style(ax, f"{overlay.title} - {view}")

    if contours:
        handles = [
            matplotlib.lines.Line2D([], [], color=c.color, label=c.label) for c in contours
        ]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
                   labelcolor="white")
    if title:
        fig.suptitle(title, color="white")
    fig.tight_layout(rect=(0, 0.03 if contours else 0, 1, 0.97 if title else 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, facecolor=fig.get_facecolor())
    plt.close(fig)
    return path


def _style(ax, label: str) -> None:
    ax.set_title(label, color="white", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
