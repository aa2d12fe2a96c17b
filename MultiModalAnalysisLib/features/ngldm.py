"""Neighbouring grey level dependence matrix (NGLDM) features, IBSI 1 section 3.11.

A voxel's dependence count is one plus the number of its ROI neighbours (Chebyshev
distance ``delta``; in a slice for 2-D) whose grey level differs by at most the coarseness
``alpha``.
"""

from __future__ import annotations

import torch

from MultiModalAnalysisLib.features.aggregation import compute_variants, zone_variants
from MultiModalAnalysisLib.features.matrix_features import grey_count_features, rename
from MultiModalAnalysisLib.features.neighbours import FlatVolume, neighbourhood

IBSI_NAMES = {
    "short": "lde", "long": "hde", "low": "lgce", "high": "hgce", "short_low": "ldlge",
    "short_high": "ldhge", "long_low": "hdlge", "long_high": "hdhge", "glnu": "glnu",
    "glnu_norm": "glnu_norm", "jnu": "dcnu", "jnu_norm": "dcnu_norm", "perc": "dc_perc",
    "gl_var": "gl_var", "j_var": "dc_var", "j_entr": "dc_entr", "j_energy": "dc_energy",
}  # fmt: skip


def dependence_counts(
    grey: torch.Tensor, n_levels: int, distance: int, coarseness: float, in_plane: bool
) -> torch.Tensor:
    """Counts ``[slices, Ng, K]`` of voxels by grey level and dependence count 1..K."""
    volume = FlatVolume(grey, distance)
    offsets = neighbourhood(distance, in_plane)
    neighbours = volume.neighbours(offsets)
    similar = (neighbours > 0) & ((neighbours - volume.values.unsqueeze(1)).abs() <= coarseness)
    dependence = similar.sum(1) + 1
    n_counts = len(offsets) + 1
    keys = (volume.slices() * n_levels + volume.values - 1) * n_counts + dependence - 1
    counts = torch.bincount(keys, minlength=grey.shape[0] * n_levels * n_counts)
    return counts.view(grey.shape[0], n_levels, n_counts)


def ngldm_feature_values(
    grey: torch.Tensor,
    n_levels: int,
    aggregation: tuple[str, ...],
    distance: int = 1,
    coarseness: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Every NGLDM feature (``ngl_*``) for the requested aggregation levels."""
    voxels = (grey > 0).sum((1, 2))
    per_slice = volume = None
    if "2D" in aggregation or "2.5D" in aggregation:
        per_slice = (dependence_counts(grey, n_levels, distance, coarseness, True), voxels)
    if "3D" in aggregation:
        counts = dependence_counts(grey, n_levels, distance, coarseness, False).sum(0)
        volume = (counts, voxels.sum())
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
