"""IBSI intensity discretisation: fixed bin number, fixed bin size, or grey levels as they are.

The result is a grey-level volume of integers 1..Ng inside the intensity mask and 0 outside
(0 is what the texture matrix builders take as "not in the ROI").
"""

from __future__ import annotations

import math

import torch

from MultiModalAnalysisLib.errors import ConfigError
from MultiModalAnalysisLib.features.settings import Discretisation


def discretise(
    image: torch.Tensor, mask: torch.Tensor, scheme: Discretisation, name: str = "image"
) -> tuple[torch.Tensor, int]:
    """Grey levels (int64, 0 outside ``mask``) and their number Ng.

    Args:
        image: intensities.
        mask: the intensity mask (bool, same shape).
        scheme: method, bin number / width and lower bound (see :class:`Discretisation`).
        name: the image's name for messages.

    Raises:
        ConfigError: ``none`` on intensities that are not positive whole numbers.
    """
    values = image[mask]
    low, high = float(values.min()), float(values.max())
    if scheme.method == "fixed_bin_number":
        bins = scheme.bin_number
        if high > low:
            levels = torch.floor(bins * (image - low) / (high - low)) + 1
        else:  # a single intensity: everything in the first bin
            levels = torch.ones_like(image)
        levels = levels.clamp(1, bins)
        n_levels = bins
    elif scheme.method == "fixed_bin_size":
        lower = low if scheme.lower_bound is None else scheme.lower_bound
        levels = (torch.floor((image - lower) / scheme.bin_width) + 1).clamp(min=1)
        n_levels = int(math.floor((high - lower) / scheme.bin_width)) + 1
        levels = levels.clamp(max=n_levels)
    else:
        if low < 1 or not bool(torch.all(values == torch.round(values))):
            raise ConfigError(
                f"{name}: discretisation_method 'none' uses intensities as grey levels, so they "
                f"must be whole numbers from 1 (found {low:g}..{high:g}). Choose "
                "fixed_bin_number or fixed_bin_size."
            )
        levels = torch.round(image)
        n_levels = int(high)
    grey = torch.where(mask, levels, torch.zeros_like(levels)).to(torch.int64)
    return grey, n_levels
