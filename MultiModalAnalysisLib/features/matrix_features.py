"""Features shared by the grey level x count matrices (GLRLM, GLSZM, GLDZM, NGLDM).

All four IBSI families define the same formulas on a matrix ``M[i, j]``: grey level ``i``
against run length, zone size, zone distance or dependence count ``j``. Written once here,
batched over matrices.
"""

from __future__ import annotations

import torch


def entropy_terms(p: torch.Tensor) -> torch.Tensor:
    """``p * log2(p)`` with 0 where ``p`` is 0."""
    return torch.where(p > 0, p * torch.log2(p.clamp(min=1e-300)), torch.zeros_like(p))


def grey_count_features(
    counts: torch.Tensor, n_voxels: torch.Tensor, j_values: torch.Tensor
) -> dict[str, torch.Tensor]:
    """IBSI features of grey level x count matrices.

    Args:
        counts: ``[B, Ng, J]`` counts (runs, zones or neighbourhoods).
        n_voxels: ``[B]`` voxels the matrices were built from (for the percentage).
        j_values: ``[J]`` the count (run length, size, distance...) of each column.

    Returns:
        Generic names: ``short``/``long`` emphasis, ``low``/``high`` grey level emphasis and
        their four products, ``glnu``, ``glnu_norm``, ``jnu``, ``jnu_norm``, ``perc``,
        ``gl_var``, ``j_var``, ``j_entr``, ``j_energy``; NaN for an empty matrix.
    """
    counts = counts.to(torch.float64)
    n_levels = counts.shape[1]
    total = counts.sum((1, 2))
    safe = total.clamp(min=1e-300)
    nan = torch.full_like(total, float("nan"))
    i = torch.arange(1, n_levels + 1, dtype=torch.float64, device=counts.device).view(1, -1, 1)
    j = j_values.to(torch.float64).view(1, 1, -1)
    i2, j2 = i * i, j * j

    def mean_of(weights: torch.Tensor) -> torch.Tensor:
        return (counts * weights).sum((1, 2)) / safe

    per_grey = counts.sum(2)
    per_j = counts.sum(1)
    p = counts / safe.view(-1, 1, 1)
    mu_i = (p * i).sum((1, 2))
    mu_j = (p * j).sum((1, 2))
    values = {
        "short": mean_of(1.0 / j2),
        "long": mean_of(j2),
        "low": mean_of(1.0 / i2),
        "high": mean_of(i2),
        "short_low": mean_of(1.0 / (i2 * j2)),
        "short_high": mean_of(i2 / j2),
        "long_low": mean_of(j2 / i2),
        "long_high": mean_of(i2 * j2),
        "glnu": (per_grey**2).sum(1) / safe,
        "glnu_norm": (per_grey**2).sum(1) / safe**2,
        "jnu": (per_j**2).sum(1) / safe,
        "jnu_norm": (per_j**2).sum(1) / safe**2,
        "perc": total / n_voxels.to(torch.float64).clamp(min=1e-300),
        "gl_var": (p * (i - mu_i.view(-1, 1, 1)) ** 2).sum((1, 2)),
        "j_var": (p * (j - mu_j.view(-1, 1, 1)) ** 2).sum((1, 2)),
        "j_entr": -entropy_terms(p).sum((1, 2)),
        "j_energy": (p**2).sum((1, 2)),
    }
    empty = total <= 0
    return {k: torch.where(empty, nan, v) for k, v in values.items()}


def rename(values: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Keep the generic features listed in ``names``, under their IBSI names."""
    return {ibsi: values[generic] for generic, ibsi in names.items()}


def compress_columns(j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values of ``j`` and each entry's column among them (so matrices stay small)."""
    values, columns = torch.unique(j, return_inverse=True)
    return values, columns
