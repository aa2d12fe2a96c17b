"""Neighbour offsets and shifted views of a volume, shared by the texture families.

Volumes are ``[z, y, x]``; 2-D work happens in axial (z) slices, as IBSI defines it.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def unique_directions(in_plane: bool) -> list[tuple[int, int, int]]:
    """The IBSI directions, one of each opposite pair: 4 in a slice, 13 in 3-D."""
    directions = []
    for offset in itertools.product((-1, 0, 1), repeat=3):
        if offset == (0, 0, 0) or (in_plane and offset[0] != 0):
            continue
        if offset > (0, 0, 0):  # lexicographically positive: one of each pair
            directions.append(offset)
    return directions


def out_of_plane_directions() -> list[tuple[int, int, int]]:
    """The 9 of the 13 3-D directions that leave the slice."""
    return [d for d in unique_directions(False) if d[0] != 0]


def neighbourhood(distance: int, in_plane: bool) -> list[tuple[int, int, int]]:
    """All offsets within Chebyshev ``distance`` (both signs), without (0, 0, 0)."""
    span = range(-distance, distance + 1)
    return [
        o
        for o in itertools.product(range(0, 1) if in_plane else span, span, span)
        if o != (0, 0, 0)
    ]


def pad(volume: torch.Tensor, width: int, value: float = 0) -> torch.Tensor:
    """``volume`` padded by ``width`` voxels on every side with ``value``."""
    if volume.dtype == torch.bool:
        return F.pad(volume.to(torch.uint8), (width,) * 6, value=int(value)).bool()
    return F.pad(volume, (width,) * 6, value=value)


def shifted(padded: torch.Tensor, offset: tuple[int, int, int], width: int) -> torch.Tensor:
    """The value at ``p + offset`` for every voxel ``p`` of the unpadded volume."""
    dz, dy, dx = offset
    z, y, x = (n - 2 * width for n in padded.shape)
    return padded[
        width + dz : width + dz + z, width + dy : width + dy + y, width + dx : width + dx + x
    ]
