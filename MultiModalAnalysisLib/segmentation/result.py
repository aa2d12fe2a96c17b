"""What a segmentation returns: a label map on the reference grid, and optionally per-class
probabilities and an uncertainty map, with the names and colours of the labels."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.io import write_image

log = logging.getLogger(__name__)

# Distinct colours (0..1 RGB) for labels 1, 2, ...; label 0 is the background.
PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.90, 0.30, 0.25),
    (0.30, 0.70, 0.35),
    (0.25, 0.50, 0.90),
    (0.95, 0.75, 0.20),
    (0.70, 0.35, 0.80),
    (0.20, 0.80, 0.80),
    (0.95, 0.50, 0.70),
    (0.60, 0.45, 0.30),
)


def default_label_colors(labels: int) -> dict[int, tuple[float, float, float]]:
    """Colours for labels ``1..labels`` from :data:`PALETTE` (cycled)."""
    return {k: PALETTE[(k - 1) % len(PALETTE)] for k in range(1, labels + 1)}


@dataclass
class SegmentationResult:
    """A segmentation of co-registered images.

    Attributes:
        labels: UInt8 label map on the reference (first image's) grid; 0 is the background.
        probabilities: a vector image on the same grid, one component per class (component 0
            is the background where the method has one), or ``None``.
        uncertainty: a float32 image on the same grid (higher = less certain), or ``None``.
        label_names: label value -> name, e.g. ``{1: "tumour"}``.
        label_colors: label value -> (r, g, b) in 0..1.
        method: the method that produced it (``gmm``, ``kmeans``, ``threshold``, ``model``).
        info: what was done, for reports (class means, threshold value, model name, timings).
    """

    labels: sitk.Image
    probabilities: sitk.Image | None = None
    uncertainty: sitk.Image | None = None
    label_names: dict[int, str] = field(default_factory=dict)
    label_colors: dict[int, tuple[float, float, float]] = field(default_factory=dict)
    method: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def mask(self, label: int = 1) -> sitk.Image:
        """The voxels of one label as a UInt8 0/1 mask."""
        return sitk.Cast(sitk.Equal(self.labels, int(label)), sitk.sitkUInt8)

    def save(
        self, labels_path: str | Path, probabilities_path: str | Path | None = None
    ) -> dict[str, Path]:
        """Write the label map, and with ``probabilities_path`` the probabilities there and
        the uncertainty map next to it (``<name>_uncertainty.nii.gz``).

        Returns:
            What was written, by kind (``labels``, ``probabilities``, ``uncertainty``).
        """
        written = {"labels": write_image(self.labels, labels_path)}
        if probabilities_path is not None:
            if self.probabilities is None:
                log.warning("this segmentation has no probabilities (a threshold gives none): "
                            "nothing was written to %s%s.", probabilities_path,
                            " (the file there is from before)"
                            if Path(probabilities_path).exists() else "")
            else:
                written["probabilities"] = write_image(self.probabilities, probabilities_path)
            companion = uncertainty_path(probabilities_path)
            if self.uncertainty is not None:
                written["uncertainty"] = write_image(self.uncertainty, companion)
            elif companion.exists():
                # An earlier run's map beside these probabilities would pass for theirs.
                companion.unlink()
                log.warning("removed %s, an earlier run's uncertainty map: this segmentation "
                            "has none.", companion)
        return written


def uncertainty_path(probabilities_path: str | Path) -> Path:
    """Where the uncertainty map goes: ``P.nii.gz`` -> ``P_uncertainty.nii.gz``."""
    path = Path(probabilities_path)
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)] + "_uncertainty" + name[-len(suffix):])
    return path.with_name(name + "_uncertainty.nii.gz")


def probability_image(components: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A float32 vector image from ``[component, z, y, x]``, on ``reference``'s grid."""
    image = sitk.GetImageFromArray(
        np.ascontiguousarray(np.moveaxis(components.astype(np.float32), 0, -1)), isVector=True
    )
    image.CopyInformation(reference)
    return image
