"""Grey-level zones (connected voxels of one grey level) and the distance to the ROI border.

Shared by the size-zone (GLSZM) and distance-zone (GLDZM) matrices. Zones are labelled by
scikit-image's connected-component labelling (compiled, one pass for all grey levels): a
union-find over voxels has no vectorised torch equivalent that is as fast on a CPU, and
the labels are a small integer volume, cheap to move to and from a GPU. 2-D zones are
labelled in one call too, with an empty slice between every two slices so no zone can
cross from one slice to the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import distance_transform_cdt
from skimage.measure import label


@dataclass
class Zones:
    """One entry per zone: grey level, size (voxels), border distance and slice."""

    levels: torch.Tensor
    sizes: torch.Tensor
    distances: torch.Tensor
    slices: torch.Tensor


def find_zones(grey: torch.Tensor, distance_map: torch.Tensor | None, in_plane: bool) -> Zones:
    """Zones of equal grey level (8-connected in a slice, or 26-connected in 3-D).

    Args:
        grey: grey levels 1..Ng in the ROI, 0 outside (``[z, y, x]``).
        distance_map: each voxel's distance to the ROI border (see :func:`border_distance`);
            None leaves the zones' distances at 0 (size zones do not need them).
        in_plane: label each axial slice on its own.
    """
    array = grey.cpu().numpy()
    if in_plane:
        spaced = np.zeros((2 * array.shape[0] - 1, *array.shape[1:]), dtype=array.dtype)
        spaced[::2] = array
        labels = label(spaced, background=0, connectivity=2)[::2]
    else:
        labels = label(array, background=0, connectivity=3)
    # per-zone values by writing every voxel's value at its zone (all equal within a zone),
    # on the host next to the labels: no boolean selection of the ROI's voxels
    ids = np.ascontiguousarray(labels).reshape(-1)
    sizes = np.bincount(ids)
    levels = np.zeros(sizes.size, dtype=np.int64)
    levels[ids] = array.reshape(-1)
    slices = np.zeros_like(levels)
    slices[ids] = np.repeat(np.arange(array.shape[0]), array[0].size)
    distances = np.zeros_like(levels)
    if distance_map is not None:
        distances[:] = np.iinfo(np.int64).max
        np.minimum.at(distances, ids, distance_map.cpu().numpy().reshape(-1).astype(np.int64))
    keep = sizes > 0
    keep[0] = False  # label 0 is the background

    def tensor(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values[keep], device=grey.device)

    return Zones(tensor(levels), tensor(sizes), tensor(distances), tensor(slices))


def border_distance(mask: torch.Tensor, in_plane: bool) -> torch.Tensor:
    """City-block distance of every ROI voxel to the nearest voxel outside the ROI.

    Voxels on the ROI's edge have distance 1; outside the image counts as outside the ROI.
    IBSI uses 4-connectedness in a slice (2-D) and 6-connectedness in 3-D. scipy's
    chamfer distance transform does it in one compiled pass over the (small) mask.
    """
    metric = np.zeros((3, 3, 3), dtype=bool)
    metric[1, 1, :] = metric[1, :, 1] = True
    if not in_plane:
        metric[:, 1, 1] = True
    padded = np.pad(mask.cpu().numpy(), 1)
    distance = distance_transform_cdt(padded, metric=metric)[1:-1, 1:-1, 1:-1]
    return torch.as_tensor(np.ascontiguousarray(distance), device=mask.device).to(torch.int64)
