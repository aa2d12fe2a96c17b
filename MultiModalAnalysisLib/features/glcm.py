"""Grey level co-occurrence matrix (GLCM) features, IBSI 1 section 3.6.

Symmetric co-occurrence counts of grey-level pairs at Chebyshev distance ``delta`` along
the 4 in-slice directions (2-D) and the 13 volume directions (3-D), built for every slice
and direction at once with one ``bincount``; features in :func:`glcm_features`, batched.
"""

from __future__ import annotations

import torch

from MultiModalAnalysisLib.features.aggregation import compute_variants, directional_variants
from MultiModalAnalysisLib.features.matrix_features import entropy_terms
from MultiModalAnalysisLib.features.neighbours import pad, shifted, unique_directions


def cooccurrence_counts(
    grey: torch.Tensor,
    n_levels: int,
    directions: list[tuple[int, int, int]],
    distance: int,
    by_slice: bool,
) -> torch.Tensor:
    """Symmetric pair counts ``[slices, directions, Ng, Ng]`` (or ``[directions, Ng, Ng]``).

    Every voxel of the box is paired with its neighbour, grey level 0 (outside) included,
    into an ``(Ng + 1) x (Ng + 1)`` histogram whose row and column 0 are then dropped:
    cheaper than selecting the pairs inside the ROI first.

    Args:
        grey: grey levels 1..Ng inside the ROI, 0 outside (``[z, y, x]``).
        n_levels: Ng.
        directions: unit offsets ``(dz, dy, dx)``; the pair offset is ``distance`` times it.
        distance: the Chebyshev distance.
        by_slice: keep one matrix per axial slice (pairs filed under the first voxel's).
    """
    side = n_levels + 1
    slices = grey.shape[0] if by_slice else 1
    wide = slices * side * side >= 2**31
    grey = grey.to(torch.int64 if wide else torch.int32)
    padded = pad(grey, distance)
    first = grey * side
    if by_slice:
        z = torch.arange(slices, device=grey.device, dtype=grey.dtype).view(-1, 1, 1)
        first = first + z * side * side
    counts = torch.stack(
        [
            torch.bincount(
                (first + shifted(padded, tuple(distance * c for c in d), distance)).reshape(-1),
                minlength=slices * side * side,
            )
            for d in directions
        ]
    )
    counts = counts.view(len(directions), slices, side, side).transpose(0, 1)[..., 1:, 1:]
    counts = counts + counts.transpose(-1, -2)
    return counts if by_slice else counts[0]


def glcm_feature_values(
    grey: torch.Tensor, n_levels: int, aggregation: tuple[str, ...], distance: int = 1
) -> dict[str, torch.Tensor]:
    """Every GLCM feature for the requested aggregation levels (``"2D"``, ``"2.5D"``, ``"3D"``)."""
    per_slice = volume = None
    if "2D" in aggregation or "2.5D" in aggregation:
        in_plane = cooccurrence_counts(grey, n_levels, unique_directions(True), distance, True)
        per_slice = (in_plane,)
    if "3D" in aggregation:
        volume = (cooccurrence_counts(grey, n_levels, unique_directions(False), distance, False),)
    variants = directional_variants(per_slice, volume)
    if "2D" not in aggregation:
        variants = {k: v for k, v in variants.items() if not k.startswith("2D")}
    if "2.5D" not in aggregation:
        variants = {k: v for k, v in variants.items() if not k.startswith("2_5D")}
    return compute_variants(variants, glcm_features, "cm")


def _anti_diagonal_sums(matrices: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` -> ``[B, 2N - 1]``: entry s sums the cells with i + j = s.

    Each row padded to 2N and the buffer read back with rows of 2N - 1 puts cell (i, j) in
    column i + j of row i, so the sums are column sums."""
    batch, n, _ = matrices.shape
    padded = matrices.new_zeros(batch, n, 2 * n)
    padded[:, :, :n] = matrices
    skewed = padded.view(batch, -1)[:, : n * (2 * n - 1)].reshape(batch, n, 2 * n - 1)
    return skewed.sum(1)


def glcm_features(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """IBSI GLCM features of ``[B, Ng, Ng]`` counts; NaN for an empty matrix."""
    counts = counts.to(torch.float64)
    n_levels = counts.shape[1]
    device = counts.device
    total = counts.sum((1, 2))
    p = counts / total.clamp(min=1e-300).view(-1, 1, 1)
    levels = torch.arange(1, n_levels + 1, dtype=torch.float64, device=device)
    i, j = levels.view(1, -1, 1), levels.view(1, 1, -1)
    p_i, p_j = p.sum(2), p.sum(1)
    mu_i = (p_i * levels).sum(1)
    mu_j = (p_j * levels).sum(1)
    var_i = (p_i * (levels - mu_i.view(-1, 1)) ** 2).sum(1)
    var_j = (p_j * (levels - mu_j.view(-1, 1)) ** 2).sum(1)

    # Distributions of |i - j| (0..Ng-1) and i + j (2..2Ng) as sums over the anti-diagonals
    # of a skewed copy: the same arithmetic on a GPU as on a CPU (no atomic scatter), in
    # memory of twice the matrix's size (one-hot products took Ng^3: 24 GB at 1000 levels).
    p_sum = _anti_diagonal_sums(p)
    by_difference = _anti_diagonal_sums(p.flip(-1))  # index Ng - 1 + (i - j)
    p_diff = by_difference[:, n_levels - 1:].clone()
    p_diff[:, 1:] += by_difference[:, : n_levels - 1].flip(-1)
    k_diff = torch.arange(n_levels, dtype=torch.float64, device=device)
    k_sum = torch.arange(2, 2 * n_levels + 1, dtype=torch.float64, device=device)
    diff_avg = (p_diff * k_diff).sum(1)
    sum_avg = (p_sum * k_sum).sum(1)

    joint_avg = (p * i).sum((1, 2))
    joint_entropy = -entropy_terms(p).sum((1, 2))
    hx = -entropy_terms(p_i).sum(1)
    outer = p_i.unsqueeze(2) * p_j.unsqueeze(1)
    log_outer = torch.log2(outer.clamp(min=1e-300))
    hxy1 = -(torch.where(p > 0, p * log_outer, torch.zeros_like(p))).sum((1, 2))
    hxy2 = -entropy_terms(outer).sum((1, 2))
    centred = i + j - mu_i.view(-1, 1, 1) - mu_j.view(-1, 1, 1)
    inverse_square = torch.where(
        k_diff > 0, 1.0 / k_diff.clamp(min=1) ** 2, torch.zeros_like(k_diff)
    )

    values = {
        "joint_max": p.amax((1, 2)),
        "joint_avg": joint_avg,
        "joint_var": (p * (i - joint_avg.view(-1, 1, 1)) ** 2).sum((1, 2)),
        "joint_entr": joint_entropy,
        "diff_avg": diff_avg,
        "diff_var": (p_diff * (k_diff - diff_avg.view(-1, 1)) ** 2).sum(1),
        "diff_entr": -entropy_terms(p_diff).sum(1),
        "sum_avg": sum_avg,
        "sum_var": (p_sum * (k_sum - sum_avg.view(-1, 1)) ** 2).sum(1),
        "sum_entr": -entropy_terms(p_sum).sum(1),
        "energy": (p**2).sum((1, 2)),
        "contrast": (p_diff * k_diff**2).sum(1),
        "dissimilarity": diff_avg,
        "inv_diff": (p_diff / (1 + k_diff)).sum(1),
        "inv_diff_norm": (p_diff / (1 + k_diff / n_levels)).sum(1),
        "inv_diff_mom": (p_diff / (1 + k_diff**2)).sum(1),
        "inv_diff_mom_norm": (p_diff / (1 + k_diff**2 / n_levels**2)).sum(1),
        "inv_var": (p_diff * inverse_square).sum(1),
        "corr": ((p * (i - mu_i.view(-1, 1, 1)) * (j - mu_j.view(-1, 1, 1))).sum((1, 2)))
        / torch.sqrt(var_i * var_j),
        "auto_corr": (p * i * j).sum((1, 2)),
        "clust_tend": (p * centred**2).sum((1, 2)),
        "clust_shade": (p * centred**3).sum((1, 2)),
        "clust_prom": (p * centred**4).sum((1, 2)),
        "info_corr1": (joint_entropy - hxy1) / hx,
        "info_corr2": torch.sqrt((1 - torch.exp(-2 * (hxy2 - joint_entropy))).clamp(min=0)),
    }
    empty = total <= 0
    nan = torch.full_like(total, float("nan"))
    return {k: torch.where(empty, nan, v) for k, v in values.items()}
