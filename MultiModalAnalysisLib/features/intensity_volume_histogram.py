"""Intensity-volume histogram (IVH) features, IBSI 1 section 3.5.

``V_x``: the fraction of the volume with at least x% of the intensity range; ``I_x``: the
lowest intensity found in at most x% of the volume. Intensities are discretised per
``ivh_discretisation_method``: ``none`` keeps whole-number intensities (CT HU, or grey
levels already discrete) as they are; non-integer intensities (PET, MR) then fall back to
fixed_bin_number with ``ivh_discretisation_bin_number`` bins.
"""

from __future__ import annotations

import torch

from MultiModalAnalysisLib.features.settings import Discretisation


def ivh_feature_values(
    values: torch.Tensor, scheme: Discretisation, non_standard: bool = True
) -> dict[str, torch.Tensor]:
    """Every IVH feature (``ivh_*``) of the ROI's intensities."""
    levels, grey = _ivh_levels(values.to(torch.float64), scheme)
    counts = torch.bincount(grey, minlength=levels.numel()).to(torch.float64)
    # volume fraction with intensity >= each level, and each level's intensity fraction
    volume = 1.0 - torch.cumsum(counts, 0) / counts.sum() + counts / counts.sum()
    span = levels[-1] - levels[0]
    gamma = (levels - levels[0]) / span if span > 0 else torch.zeros_like(levels)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=values.device)

    def volume_at(fraction: float) -> torch.Tensor:
        chosen = volume[gamma >= fraction - 1e-12]
        return chosen.max() if chosen.numel() else nan

    step = levels[1] - levels[0] if levels.numel() > 1 else 1.0

    def intensity_at(fraction: float) -> torch.Tensor:
        chosen = levels[volume <= fraction + 1e-12]
        # even the highest level holds more than the fraction: the next level up, as
        # IBSI's reference implementation does
        return chosen.min() if chosen.numel() else levels[-1] + step

    v10, v90 = volume_at(0.10), volume_at(0.90)
    i10, i90 = intensity_at(0.10), intensity_at(0.90)
    features = {
        "ivh_v10": v10,
        "ivh_v90": v90,
        "ivh_i10": i10,
        "ivh_i90": i90,
        "ivh_diff_v10_v90": v10 - v90,
        "ivh_diff_i10_i90": i10 - i90,
    }
    if non_standard:
        features["ivh_auc"] = torch.trapezoid(volume, gamma) if span > 0 else nan
    return features


def _ivh_levels(values: torch.Tensor, scheme: Discretisation) -> tuple[torch.Tensor, torch.Tensor]:
    """The IVH's intensity levels (every level of the range) and each voxel's level index."""
    low = float(values.min()) if scheme.lower_bound is None else scheme.lower_bound
    high = float(values.max())
    method = scheme.method
    if method == "none" and not bool(torch.all(values == torch.round(values))):
        method = "fixed_bin_number"
    if method == "none":
        low = round(low)
        levels = torch.arange(low, round(high) + 1, dtype=torch.float64, device=values.device)
        return levels, (torch.round(values) - low).long().clamp(min=0)
    if method == "fixed_bin_size":
        width = scheme.bin_width
        n_bins = int((high - low) // width) + 1
        index = torch.floor((values - low) / width).long().clamp(0, n_bins - 1)
        # each bin stands for its centre
        levels = (
            low + (torch.arange(n_bins, dtype=torch.float64, device=values.device) + 0.5) * width
        )
        return levels, index
    low, n_bins = float(values.min()), scheme.bin_number
    index = (
        torch.floor(n_bins * (values - low) / max(high - low, 1e-300)).long().clamp(0, n_bins - 1)
    )
    return torch.arange(1, n_bins + 1, dtype=torch.float64, device=values.device), index
