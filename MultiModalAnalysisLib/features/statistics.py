"""Intensity statistics (IBSI 1 section 3.3) and the shared first-order formulas.

The intensity histogram (section 3.4) applies the same formulas to discretised grey
levels, so both families call :func:`first_order`.
"""

from __future__ import annotations

import torch


def percentile(sorted_values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile of sorted values, linear interpolation (as numpy's default)."""
    position = (sorted_values.numel() - 1) * q / 100.0
    below = int(position)
    above = min(below + 1, sorted_values.numel() - 1)
    fraction = position - below
    return sorted_values[below] + (sorted_values[above] - sorted_values[below]) * fraction


def first_order(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean, variance, skewness, excess kurtosis, percentiles and deviations of ``values``.

    Variance and moments are the population (biased) ones, as IBSI defines them;
    skewness and kurtosis are 0 for a constant region (IBSI's convention).
    """
    x = values.to(torch.float64).flatten()
    ordered = torch.sort(x).values
    mean = x.mean()
    centred = x - mean
    variance = (centred**2).mean()
    p10, p25, p75, p90 = (percentile(ordered, q) for q in (10, 25, 75, 90))
    median = percentile(ordered, 50)
    robust = x[(x >= p10) & (x <= p90)]
    zero = torch.zeros_like(mean)
    constant = variance <= 0
    return {
        "mean": mean,
        "var": variance,
        "skew": torch.where(
            constant, zero, (centred**3).mean() / variance.clamp(min=1e-300) ** 1.5
        ),
        "kurt": torch.where(
            constant, zero, (centred**4).mean() / variance.clamp(min=1e-300) ** 2 - 3
        ),
        "median": median,
        "min": ordered[0],
        "p10": p10,
        "p90": p90,
        "max": ordered[-1],
        "iqr": p75 - p25,
        "range": ordered[-1] - ordered[0],
        "mad": centred.abs().mean(),
        "rmad": (robust - robust.mean()).abs().mean(),
        "medad": (x - median).abs().mean(),
        "cov": torch.sqrt(variance) / mean,
        "qcod": (p75 - p25) / (p75 + p25),
    }


def statistics_feature_values(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every intensity-statistics feature (``stat_*``) of the ROI's intensities."""
    features = first_order(values)
    x = values.to(torch.float64)
    features["energy"] = (x**2).sum()
    features["rms"] = torch.sqrt((x**2).mean())
    return {f"stat_{k}": v for k, v in features.items()}
