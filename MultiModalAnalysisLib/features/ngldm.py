"""Neighbouring grey level dependence matrix (NGLDM) features, IBSI 1 section 3.11.

A voxel's dependence count is one plus the number of its ROI neighbours (Chebyshev
distance ``delta``; in a slice for 2-D) whose grey level differs by at most the coarseness
``alpha``, summed over shifted views of the volume.
"""

from __future__ import annotations

import torch

from MultiModalAnalysisLib.features.aggregation import compute_variants, zone_variants
from MultiModalAnalysisLib.features.matrix_features import grey_count_features, rename
from MultiModalAnalysisLib.features.neighbours import accumulate_neighbours

IBSI_NAMES = {
    "short": "lde", "long": "hde", "low": "lgce", "high": "hgce", "short_low": "ldlge",
    "short_high": "ldhge", "long_low": "hdlge", "long_high": "hdhge", "glnu": "glnu",
    "glnu_norm": "glnu_norm", "jnu": "dcnu", "jnu_norm": "dcnu_norm", "perc": "dc_perc",
    "gl_var": "gl_var", "j_var": "dc_var", "j_entr": "dc_entr", "j_energy": "dc_energy",
}  # fmt: skip


def dependence_counts(
    grey: torch.Tensor, n_levels: int, distance: int, coarseness: float, levels: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Counts ``[slices, Ng, K]`` of voxels by grey level and dependence count 1..K.

    Keyed ``"2D"`` (neighbourhoods in the slice, K = 9 for distance 1) and ``"3D"`` (K = 27).
    """
    values = grey.to(torch.int32)

    def similar(centre: torch.Tensor, nb: torch.Tensor) -> tuple[torch.Tensor]:
        if coarseness == 0:  # the usual case: equal grey levels (centre > 0 in the ROI)
            return ((nb == centre).to(torch.int32),)
        return (((nb > 0) & ((nb - centre).abs() <= coarseness)).to(torch.int32),)

    sums = accumulate_neighbours(values, distance, levels, similar)
    inside = values > 0
    z_index = torch.arange(grey.shape[0], device=grey.device).view(-1, 1, 1).expand_as(grey)
    result = {}
    for level, (count,) in sums.items():
        n_counts = (2 * distance + 1) ** (2 if level == "2D" else 3)
        keys = (z_index[inside] * n_levels + values[inside] - 1) * n_counts + count[inside]
        counts = torch.bincount(keys, minlength=grey.shape[0] * n_levels * n_counts)
        result[level] = counts.view(grey.shape[0], n_levels, n_counts)
    return result


def ngldm_feature_values(
    grey: torch.Tensor,
    n_levels: int,
    aggregation: tuple[str, ...],
    distance: int = 1,
    coarseness: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Every NGLDM feature (``ngl_*``) for the requested aggregation levels."""
    voxels = (grey > 0).sum((1, 2))
    levels = tuple(
        level
        for level, wanted in (("2D", {"2D", "2.5D"}), ("3D", {"3D"}))
        if wanted & set(aggregation)
    )
    counts = dependence_counts(grey, n_levels, distance, coarseness, levels)
    per_slice = (counts["2D"], voxels) if "2D" in counts else None
    volume = (counts["3D"].sum(0), voxels.sum()) if "3D" in counts else None
    variants = zone_variants(per_slice, volume)
    variants = {k: v for k, v in variants.items() if k.replace("_", ".") in aggregation}
    # 2-D and 3-D matrices have different widths (9 or 27 counts): pad to the wider one
    width = max(v[0].shape[-1] for v in variants.values())
    variants = {
        k: [torch.nn.functional.pad(v[0], (0, width - v[0].shape[-1])), v[1]]
        for k, v in variants.items()
    }
    j = torch.arange(1, width + 1, dtype=torch.float64, device=grey.device)
    return compute_variants(
        variants,
        lambda counts, n_voxels: rename(grey_count_features(counts, n_voxels, j), IBSI_NAMES),
        "ngl",
    )
