"""IBSI intensity discretisation: fixed bin number, fixed bin size, or grey levels as they are.

The result is a grey-level volume of integers 1..Ng inside the intensity mask and 0 outside
(0 is what the texture matrix builders take as "not in the ROI").
"""

from __future__ import annotations

import math

import torch

from MultiModalAnalysisLib.errors import ConfigError
from MultiModalAnalysisLib.features.settings import MAX_GREY_LEVELS, Discretisation


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
        ConfigError: ``none`` on intensities that are not positive whole numbers; more than
            ``MAX_GREY_LEVELS`` grey levels; a fixed-bin-size lower bound above the ROI.
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
        if lower > high:
            raise ConfigError(
                f"{name}: the discretisation lower bound {lower:g} is above the highest "
                f"intensity in the ROI ({high:g}): every voxel would fall below the first bin. "
                "Check the lower bound (or resegmentation_range) against the image's units."
            )
        n_levels = int(math.floor((high - lower) / scheme.bin_width)) + 1
        if n_levels > MAX_GREY_LEVELS:
            raise ConfigError(
                f"{name}: a bin width of {scheme.bin_width:g} over the ROI's intensities "
                f"{lower:g}..{high:g} makes {n_levels} grey levels, more than the "
                f"{MAX_GREY_LEVELS} the texture matrices take: use a wider bin width (e.g. 25 "
                "HU for CT, 0.5 SUV for PET; is the image in the units you think?)."
            )
        levels = (torch.floor((image - lower) / scheme.bin_width) + 1).clamp(min=1)
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
        if n_levels > MAX_GREY_LEVELS:
            raise ConfigError(
                f"{name}: discretisation_method 'none' takes the intensities as grey levels, "
                f"up to {n_levels} here, more than the {MAX_GREY_LEVELS} the texture matrices "
                "take: choose fixed_bin_number or fixed_bin_size."
            )
    grey = torch.where(mask, levels, torch.zeros_like(levels)).to(torch.int64)
    return grey, n_levels
