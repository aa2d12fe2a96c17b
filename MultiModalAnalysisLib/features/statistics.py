"""Intensity statistics (IBSI 1 section 3.3) and the shared first-order formulas.

The intensity histogram (section 3.4) applies the same formulas to discretised grey
levels, so both families call :func:`first_order`.
"""

from __future__ import annotations

import torch


def percentiles(values: torch.Tensor, qs: tuple[float, ...]) -> list[torch.Tensor]:
    """Percentiles with linear interpolation between order statistics (numpy's default).

    Whole-number values in a modest range (CT HU, discretised grey levels) are counted in
    a histogram and the order statistics read from its cumulative sum, linear in the
    number of voxels; other values are sorted.
    """
    n = values.numel()
    positions = [(n - 1) * q / 100.0 for q in qs]
    ranks = torch.tensor(
        [r for p in positions for r in (int(p), min(int(p) + 1, n - 1))], device=values.device
    )
    low, high = values.min(), values.max()
    if float(high - low) < 4 * n + 65536 and bool(torch.all(values == torch.round(values))):
        counts = torch.bincount((values - low).to(torch.int64))
        order = torch.searchsorted(torch.cumsum(counts, 0), ranks, right=True)
        ordered = order.to(values.dtype) + low
    else:
        ordered = torch.sort(values).values[ranks]
    return [
        ordered[2 * k] + (ordered[2 * k + 1] - ordered[2 * k]) * (p - int(p))
        for k, p in enumerate(positions)
    ]


def first_order(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean, variance, skewness, excess kurtosis, percentiles and deviations of ``values``.

    Variance and moments are the population (biased) ones, as IBSI defines them;
    skewness and kurtosis are 0 for a constant region (IBSI's convention).
    """
    x = values.to(torch.float64).flatten()
    mean = x.mean()
    centred = x - mean
    variance = (centred**2).mean()
    p10, p25, median, p75, p90 = percentiles(x, (10, 25, 50, 75, 90))
    minimum, maximum = x.min(), x.max()
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
        "min": minimum,
        "p10": p10,
        "p90": p90,
        "max": maximum,
        "iqr": p75 - p25,
        "range": maximum - minimum,
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
