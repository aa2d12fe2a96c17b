"""Grey level distance zone matrix (GLDZM) features, IBSI 1 section 3.9.

A zone's distance is the smallest border distance of its voxels, measured on the
morphological mask (4-connected in a slice for 2-D, 6-connected for 3-D).
"""

from __future__ import annotations

import torch

from MultiModalAnalysisLib.features.glszm import zone_feature_values
from MultiModalAnalysisLib.features.zones import Zones

IBSI_NAMES = {
    "short": "sde", "long": "lde", "low": "lgze", "high": "hgze", "short_low": "sdlge",
    "short_high": "sdhge", "long_low": "ldlge", "long_high": "ldhge", "glnu": "glnu",
    "glnu_norm": "glnu_norm", "jnu": "zdnu", "jnu_norm": "zdnu_norm", "perc": "z_perc",
    "gl_var": "gl_var", "j_var": "zd_var", "j_entr": "zd_entr",
}  # fmt: skip


def gldzm_feature_values(
    grey: torch.Tensor, n_levels: int, zones_2d: Zones | None, zones_3d: Zones | None
) -> dict[str, torch.Tensor]:
    """Every GLDZM feature (``dzm_*``) for the zones given (their distances set)."""
    return zone_feature_values(grey, n_levels, zones_2d, zones_3d, "distances", "dzm", IBSI_NAMES)
