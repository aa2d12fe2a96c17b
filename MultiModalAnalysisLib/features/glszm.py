"""Grey level size zone matrix (GLSZM) features, IBSI 1 section 3.8."""

from __future__ import annotations

import torch

from MultiModalAnalysisLib.features.aggregation import compute_variants, zone_variants
from MultiModalAnalysisLib.features.matrix_features import (
    compress_columns,
    grey_count_features,
    rename,
)
from MultiModalAnalysisLib.features.zones import Zones

IBSI_NAMES = {
    "short": "sze", "long": "lze", "low": "lgze", "high": "hgze", "short_low": "szlge",
    "short_high": "szhge", "long_low": "lzlge", "long_high": "lzhge", "glnu": "glnu",
    "glnu_norm": "glnu_norm", "jnu": "zsnu", "jnu_norm": "zsnu_norm", "perc": "z_perc",
    "gl_var": "gl_var", "j_var": "zs_var", "j_entr": "zs_entr",
}  # fmt: skip


def zone_matrices(
    zones_2d: Zones | None,
    zones_3d: Zones | None,
    n_levels: int,
    n_slices: int,
    column_of: str,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Counts ``[slices, Ng, J]`` (2-D) and ``[Ng, J]`` (3-D) over the distinct ``column_of``.

    Args:
        zones_2d, zones_3d: zones from :func:`zones.find_zones` (either may be None).
        column_of: ``"sizes"`` (GLSZM) or ``"distances"`` (GLDZM).

    Returns:
        The two count tensors (None where no zones were given) and the column values.
    """
    present = [z for z in (zones_2d, zones_3d) if z is not None]
    values, columns = compress_columns(torch.cat([getattr(z, column_of) for z in present]))
    n_columns = values.numel()
    split = [getattr(z, column_of).numel() for z in present]
    columns = list(columns.split(split))
    per_slice = volume = None
    if zones_2d is not None:
        keys = (zones_2d.slices * n_levels + zones_2d.levels - 1) * n_columns + columns.pop(0)
        per_slice = torch.bincount(keys, minlength=n_slices * n_levels * n_columns)
        per_slice = per_slice.view(n_slices, n_levels, n_columns)
    if zones_3d is not None:
        keys = (zones_3d.levels - 1) * n_columns + columns.pop(0)
        volume = torch.bincount(keys, minlength=n_levels * n_columns).view(n_levels, n_columns)
    return per_slice, volume, values


def zone_feature_values(
    grey: torch.Tensor,
    n_levels: int,
    zones_2d: Zones | None,
    zones_3d: Zones | None,
    column_of: str,
    prefix: str,
    names: dict[str, str],
) -> dict[str, torch.Tensor]:
    """Zone-matrix features (GLSZM or GLDZM) for the 2-D, 2.5-D and 3-D zones given."""
    per_slice, volume, values = zone_matrices(
        zones_2d, zones_3d, n_levels, grey.shape[0], column_of
    )
    voxels = (grey > 0).sum((1, 2))
    variants = zone_variants(
        None if per_slice is None else (per_slice, voxels),
        None if volume is None else (volume, voxels.sum()),
    )
    return compute_variants(
        variants,
        lambda counts, n_voxels, j: rename(grey_count_features(counts, n_voxels, j), names),
        prefix,
        j=values,
    )


def glszm_feature_values(
    grey: torch.Tensor, n_levels: int, zones_2d: Zones | None, zones_3d: Zones | None
) -> dict[str, torch.Tensor]:
    """Every GLSZM feature (``szm_*``) for the zones given."""
    return zone_feature_values(grey, n_levels, zones_2d, zones_3d, "sizes", "szm", IBSI_NAMES)
