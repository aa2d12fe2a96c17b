"""Clean-up of binary and label masks: connected components, hole filling, keeping the
largest component, removing components below a volume in mm^3. SimpleITK filters do the
work; every function returns a new image and keeps the input's grid and label values."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError


def _binary(mask: sitk.Image) -> sitk.Image:
    return sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8)


def voxel_volume_mm3(image: sitk.Image) -> float:
    """Volume of one voxel in mm^3."""
    return float(np.prod(image.GetSpacing()))


def connected_components(mask: sitk.Image, *, fully_connected: bool = False) -> sitk.Image:
    """Label the connected components of a mask's non-zero voxels, largest first (1, 2, ...).

    Args:
        mask: any label image; every non-zero voxel counts as foreground.
        fully_connected: 26-connectivity instead of 6 (faces only).
    """
    components = sitk.ConnectedComponent(_binary(mask), fully_connected)
    return sitk.RelabelComponent(components, sortByObjectSize=True)


def keep_largest_component(mask: sitk.Image, *, fully_connected: bool = False) -> sitk.Image:
    """The largest connected component of a binary mask (UInt8 0/1; empty stays empty)."""
    return sitk.Cast(sitk.Equal(connected_components(mask, fully_connected=fully_connected), 1),
                     sitk.sitkUInt8)


def component_at(mask: sitk.Image, index_xyz: tuple[int, int, int]) -> sitk.Image:
    """The connected component of a binary mask holding the voxel ``index_xyz`` (x, y, z).

    Returns an empty mask when that voxel is not set.
    """
    components = connected_components(mask)
    label = components[tuple(int(i) for i in index_xyz)]
    if label == 0:
        return sitk.Cast(components * 0, sitk.sitkUInt8)
    return sitk.Cast(sitk.Equal(components, int(label)), sitk.sitkUInt8)


def _check_min_volume(min_volume_mm3: float) -> None:
    if not min_volume_mm3 >= 0:  # also NaN
        raise ConfigError(f"the minimum component volume must be 0 mm^3 or more, not "
                          f"{min_volume_mm3}.")


def remove_small_components(mask: sitk.Image, min_volume_mm3: float) -> sitk.Image:
    """Drop the connected components smaller than ``min_volume_mm3`` (binary UInt8 out)."""
    _check_min_volume(min_volume_mm3)
    min_voxels = int(np.ceil(min_volume_mm3 / voxel_volume_mm3(mask)))
    components = sitk.RelabelComponent(
        sitk.ConnectedComponent(_binary(mask)), minimumObjectSize=max(min_voxels, 1)
    )
    return sitk.Cast(sitk.NotEqual(components, 0), sitk.sitkUInt8)


def fill_holes(mask: sitk.Image) -> sitk.Image:
    """Fill the enclosed holes of a binary mask in 3-D (UInt8 0/1 out)."""
    return sitk.Cast(sitk.BinaryFillhole(_binary(mask), fullyConnected=False), sitk.sitkUInt8)


def clean_labels(
    labels: sitk.Image,
    *,
    keep_largest: bool = False,
    fill: bool = False,
    min_volume_mm3: float = 0.0,
) -> sitk.Image:
    """Apply the chosen clean-ups to each label of a label map separately.

    Labels are processed in increasing order; where filling a hole of one label would cover
    another label, the other label keeps its voxels.

    Args:
        labels: a label map (0 = background).
        keep_largest: keep only the largest component of each label.
        fill: fill enclosed holes of each label.
        min_volume_mm3: remove components smaller than this.

    Returns:
        A new label map of the same pixel type on the same grid.
    """
    _check_min_volume(min_volume_mm3)  # here too: a negative value never reaches the removal
    if not (keep_largest or fill or min_volume_mm3 > 0):
        return sitk.Image(labels)
    source = sitk.GetArrayViewFromImage(labels)
    result = np.zeros(source.shape, dtype=source.dtype)
    for value in np.unique(source):
        if value == 0:
            continue
        mask = sitk.GetImageFromArray((source == value).astype(np.uint8))
        mask.CopyInformation(labels)
        if min_volume_mm3 > 0:
            mask = remove_small_components(mask, min_volume_mm3)
        if keep_largest:
            mask = keep_largest_component(mask)
        if fill:
            mask = fill_holes(mask)
        region = sitk.GetArrayViewFromImage(mask) != 0
        result[region & ((source == 0) | (source == value)) & (result == 0)] = value
    cleaned = sitk.GetImageFromArray(result)
    cleaned.CopyInformation(labels)
    return cleaned
