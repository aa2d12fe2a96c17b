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
    labels = torch.as_tensor(np.ascontiguousarray(labels), device=grey.device).to(torch.int64)
    inside = grey > 0
    ids = labels[inside]
    n_zones = int(ids.max()) + 1 if ids.numel() else 1
    z_index = torch.arange(grey.shape[0], device=grey.device).view(-1, 1, 1).expand_as(grey)
    levels = torch.zeros(n_zones, dtype=torch.int64, device=grey.device)
    levels.scatter_(0, ids, grey[inside])
    slices = torch.zeros_like(levels).scatter_(0, ids, z_index[inside])
    sizes = torch.bincount(ids, minlength=n_zones)
    if distance_map is None:
        distances = torch.zeros_like(levels)
    else:
        far = torch.full_like(levels, torch.iinfo(torch.int64).max)
        distances = far.scatter_reduce(0, ids, distance_map[inside].to(torch.int64), "amin")
    keep = sizes > 0
    keep[0] = False  # label 0 is the background
    return Zones(levels[keep], sizes[keep], distances[keep], slices[keep])


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
