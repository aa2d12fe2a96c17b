"""Neighbourhood grey tone difference matrix (NGTDM) features, IBSI 1 section 3.10.

For each ROI voxel, the mean grey level of its neighbours inside the ROI (Chebyshev
distance ``delta``, the voxel itself excluded; in a slice for 2-D) comes from one gather of
all neighbours; voxels without any ROI neighbour are left out, as IBSI does.
"""

from __future__ import annotations

import torch

from MultiModalAnalysisLib.features.aggregation import compute_variants, zone_variants
from MultiModalAnalysisLib.features.neighbours import FlatVolume, neighbourhood


def tone_differences(
    grey: torch.Tensor, n_levels: int, distance: int, in_plane: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slice ``s[slices, Ng]`` (sum of |i - neighbourhood mean|) and ``n[slices, Ng]``.

    For 3-D work (``in_plane=False``) sum over slices to get the volume's matrix.
    """
    volume = FlatVolume(grey, distance)
    neighbours = volume.neighbours(neighbourhood(distance, in_plane))
    inside = neighbours > 0
    count = inside.sum(1)
    total = neighbours.sum(1, dtype=torch.float64)
    valid = count > 0
    levels = volume.values[valid]
    difference = (levels - total[valid] / count[valid]).abs()
    keys = volume.slices()[valid] * n_levels + levels - 1
    size = grey.shape[0] * n_levels
    s = torch.zeros(size, dtype=torch.float64, device=grey.device).index_add_(0, keys, difference)
    n = torch.bincount(keys, minlength=size).to(torch.float64)
    return s.view(-1, n_levels), n.view(-1, n_levels)


def ngtdm_features(s: torch.Tensor, n: torch.Tensor) -> dict[str, torch.Tensor]:
    """IBSI NGTDM features of ``[B, Ng]`` tone-difference sums and counts."""
    n_levels = s.shape[1]
    n_valid = n.sum(1)
    p = n / n_valid.clamp(min=1e-300).view(-1, 1)
    levels = torch.arange(1, n_levels + 1, dtype=torch.float64, device=s.device).view(1, -1)
    present = p > 0
    n_present = present.sum(1).to(torch.float64)
    both = present.unsqueeze(2) & present.unsqueeze(1)
    i, j = levels.unsqueeze(2), levels.unsqueeze(1)
    p_i, p_j = p.unsqueeze(2), p.unsqueeze(1)
    s_i, s_j = s.unsqueeze(2), s.unsqueeze(1)
    weighted = (p * s).sum(1)
    s_total = s.sum(1)
    square = (i - j) ** 2
    zero = torch.zeros((), dtype=torch.float64, device=s.device)

    contrast = (
        (torch.where(both, p_i * p_j * square, zero).sum((1, 2)) / (n_present * (n_present - 1)))
        * s_total
        / n_valid
    )
    busy_denominator = torch.where(both, (i * p_i - j * p_j).abs(), zero).sum((1, 2))
    complexity = (
        torch.where(
            both, (i - j).abs() * (p_i * s_i + p_j * s_j) / (p_i + p_j).clamp(min=1e-300), zero
        ).sum((1, 2))
        / n_valid
    )
    strength = torch.where(both, (p_i + p_j) * square, zero).sum((1, 2)) / s_total
    values = {
        "coarseness": 1.0 / weighted,
        "contrast": contrast,
        "busyness": weighted / busy_denominator,
        "complexity": complexity,
        "strength": strength,
    }
    empty = n_valid <= 0
    nan = torch.full_like(n_valid, float("nan"))
    return {k: torch.where(empty, nan, v) for k, v in values.items()}


def ngtdm_feature_values(
    grey: torch.Tensor, n_levels: int, aggregation: tuple[str, ...], distance: int = 1
) -> dict[str, torch.Tensor]:
    """Every NGTDM feature (``ngt_*``) for the requested aggregation levels."""
    per_slice = volume = None
    if "2D" in aggregation or "2.5D" in aggregation:
        per_slice = tone_differences(grey, n_levels, distance, in_plane=True)
    if "3D" in aggregation:
        s, n = tone_differences(grey, n_levels, distance, in_plane=False)
        volume = (s.sum(0), n.sum(0))
    variants = zone_variants(per_slice, volume)
    variants = {k: v for k, v in variants.items() if k.replace("_", ".") in aggregation}
    return compute_variants(variants, ngtdm_features, "ngt")
