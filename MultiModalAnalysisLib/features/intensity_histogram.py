"""Intensity histogram features, IBSI 1 section 3.4: first-order features of grey levels."""

from __future__ import annotations

import torch

from MultiModalAnalysisLib.features.matrix_features import entropy_terms
from MultiModalAnalysisLib.features.statistics import first_order


def intensity_histogram_feature_values(
    grey_values: torch.Tensor, n_levels: int
) -> dict[str, torch.Tensor]:
    """Every intensity-histogram feature (``ih_*``) of the ROI's grey levels (1..Ng)."""
    features = first_order(grey_values)
    counts = torch.bincount(grey_values - 1, minlength=n_levels).to(torch.float64)
    p = counts / counts.sum()
    levels = torch.arange(1, n_levels + 1, dtype=torch.float64, device=grey_values.device)
    # the most frequent grey level; among equally frequent ones, the closest to the mean
    modes = levels[counts == counts.max()]
    features["mode"] = modes[torch.argmin((modes - features["mean"]).abs())]
    features["entropy"] = -entropy_terms(p).sum()
    features["uniformity"] = (p**2).sum()
    gradient = _histogram_gradient(counts)
    features["max_grad"] = gradient.max()
    features["max_grad_g"] = levels[torch.argmax(gradient)]
    features["min_grad"] = gradient.min()
    features["min_grad_g"] = levels[torch.argmin(gradient)]
    return {f"ih_{k}": v for k, v in features.items()}


def _histogram_gradient(counts: torch.Tensor) -> torch.Tensor:
    """IBSI histogram gradient: forward/backward difference at the ends, central inside."""
    if counts.numel() == 1:
        return torch.zeros_like(counts)
    gradient = torch.empty_like(counts)
    gradient[0] = counts[1] - counts[0]
    gradient[-1] = counts[-1] - counts[-2]
    gradient[1:-1] = (counts[2:] - counts[:-2]) / 2
    return gradient
