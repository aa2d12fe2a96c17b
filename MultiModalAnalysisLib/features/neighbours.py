"""Neighbour offsets and shifted views of a volume, shared by the texture families.

Volumes are ``[z, y, x]``; 2-D work happens in axial (z) slices, as IBSI defines it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
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


def neighbourhood(distance: int, in_plane: bool) -> list[tuple[int, int, int]]:
    """All offsets within Chebyshev ``distance`` (both signs), without (0, 0, 0)."""
    span = range(-distance, distance + 1)
    return [
        o
        for o in itertools.product(range(0, 1) if in_plane else span, span, span)
        if o != (0, 0, 0)
    ]


def flat_positions(flags: torch.Tensor) -> torch.Tensor:
    """Flat indices (int64, ascending) of the non-zero entries of a 1-D tensor.

    On the CPU numpy's ``flatnonzero`` is several times faster than ``torch.nonzero``
    and shares the memory, so it is used there.
    """
    if flags.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(flags.numpy()))
    return torch.nonzero(flags).squeeze(1)


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


def accumulate_neighbours(
    grey: torch.Tensor,
    distance: int,
    levels: tuple[str, ...],
    combine: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]],
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Sums over each voxel's neighbours (Chebyshev ``distance``) of ``combine(grey, nb)``.

    ``levels`` holds ``"2D"`` (neighbours in the slice) and/or ``"3D"`` (all): the 3-D sums
    continue the in-slice ones, so both cost one pass over the offsets. Works on the whole
    box with shifted views, whose memory stays that of a few volumes.
    """
    padded = pad(grey, distance)
    in_plane = neighbourhood(distance, in_plane=True)
    across = [o for o in neighbourhood(distance, in_plane=False) if o[0] != 0]
    totals: tuple[torch.Tensor, ...] | None = None
    result = {}
    for offset in in_plane + (across if "3D" in levels else []):
        terms = combine(grey, shifted(padded, offset, distance))
        totals = (
            terms if totals is None else tuple(t + u for t, u in zip(totals, terms, strict=True))
        )
        if offset == in_plane[-1] and "2D" in levels:
            result["2D"] = totals
    if "3D" in levels:
        result["3D"] = totals
    return result
