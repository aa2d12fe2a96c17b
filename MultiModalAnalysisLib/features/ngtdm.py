"""Neighbourhood grey tone difference matrix (NGTDM) features, IBSI 1 section 3.10.

For each ROI voxel, the mean grey level of its neighbours inside the ROI (Chebyshev
distance ``delta``, the voxel itself excluded; in a slice for 2-D) comes from sums of
shifted views of the volume; voxels without any ROI neighbour are left out, as IBSI does.
"""

from __future__ import annotations

import torch

from MultiModalAnalysisLib.features.aggregation import compute_variants, zone_variants
from MultiModalAnalysisLib.features.neighbours import accumulate_neighbours


def tone_differences(
    grey: torch.Tensor, n_levels: int, distance: int, levels: tuple[str, ...]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per slice ``s[slices, Ng]`` (sum of |i - neighbourhood mean|) and ``n[slices, Ng]``.

    Keyed ``"2D"`` (neighbourhoods in the slice) and ``"3D"``; sum the 3-D ones over slices
    to get the volume's matrix.
    """
    values = grey.to(torch.int32)
    sums = accumulate_neighbours(
        values, distance, levels, lambda centre, nb: (nb, nb.clamp(max=1))
    )  # neighbour grey levels (0 outside) and the number of neighbours inside
    inside = values > 0
    z_index = torch.arange(grey.shape[0], device=grey.device).view(-1, 1, 1).expand_as(grey)
    size = grey.shape[0] * n_levels
    result = {}
    for level, (total, count) in sums.items():
        valid = inside & (count > 0)
        centre = values[valid]
        difference = (centre - total[valid].to(torch.float64) / count[valid]).abs()
        keys = z_index[valid] * n_levels + centre - 1
        s = torch.zeros(size, dtype=torch.float64, device=grey.device)
        s.index_add_(0, keys, difference)
        n = torch.bincount(keys, minlength=size).to(torch.float64)
        result[level] = (s.view(-1, n_levels), n.view(-1, n_levels))
    return result


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
    levels = tuple(
        level
        for level, wanted in (("2D", {"2D", "2.5D"}), ("3D", {"3D"}))
        if wanted & set(aggregation)
    )
    sums = tone_differences(grey, n_levels, distance, levels)
    per_slice = sums.get("2D")
    volume = None if "3D" not in sums else tuple(t.sum(0) for t in sums["3D"])
    variants = zone_variants(per_slice, volume)
    variants = {k: v for k, v in variants.items() if k.replace("_", ".") in aggregation}
    return compute_variants(variants, ngtdm_features, "ngt")
