"""IBSI feature aggregation: matrices per slice / direction, merged or averaged.

Every texture family builds count matrices with leading dimensions (slice, direction) for
2-D work and (direction,) for 3-D work; this module forms the IBSI variants, computes the
features of all of them in one batched call, and averages where IBSI averages:

==========  ============================================================================
tag         what is computed
==========  ============================================================================
2D_avg      features per slice and direction, averaged
2D_comb     directions merged per slice; features averaged over slices
2_5D_avg    slices merged per direction; features averaged over directions
2_5D_comb   everything merged into one matrix
3D_avg      3-D matrices per direction, features averaged
3D_comb     3-D matrices merged
2D / 2_5D / 3D  families without directions: per slice averaged / slices merged / 3-D
==========  ============================================================================

Empty matrices (a slice or direction without any pair, run or zone) give NaN features and
are left out of the averages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Parts = Sequence[torch.Tensor]
FeatureFunction = Callable[..., dict[str, torch.Tensor]]


def directional_variants(per_slice: Parts | None, volume: Parts | None) -> dict[str, list]:
    """IBSI variants of directional matrices.

    Args:
        per_slice: tensors shaped ``[slices, directions, ...]`` (2-D), or None.
        volume: tensors shaped ``[directions, ...]`` (3-D), or None.
    """
    variants: dict[str, list] = {}
    if per_slice is not None:
        s, d = per_slice[0].shape[:2]
        variants["2D_avg"] = [p.reshape(s * d, *p.shape[2:]) for p in per_slice]
        variants["2D_comb"] = [p.sum(1) for p in per_slice]
        variants["2_5D_avg"] = [p.sum(0) for p in per_slice]
        variants["2_5D_comb"] = [p.sum((0, 1)).unsqueeze(0) for p in per_slice]
    if volume is not None:
        variants["3D_avg"] = list(volume)
        variants["3D_comb"] = [p.sum(0).unsqueeze(0) for p in volume]
    return variants


def zone_variants(per_slice: Parts | None, volume: Parts | None) -> dict[str, list]:
    """IBSI variants of non-directional matrices.

    Args:
        per_slice: tensors shaped ``[slices, ...]`` (2-D), or None.
        volume: tensors shaped ``[...]`` (one 3-D matrix), or None.
    """
    variants: dict[str, list] = {}
    if per_slice is not None:
        variants["2D"] = list(per_slice)
        variants["2_5D"] = [p.sum(0).unsqueeze(0) for p in per_slice]
    if volume is not None:
        variants["3D"] = [p.unsqueeze(0) for p in volume]
    return variants


def compute_variants(
    variants: dict[str, list], features: FeatureFunction, prefix: str, **options
) -> dict[str, torch.Tensor]:
    """Features of every variant, named ``<prefix>_<feature>_<variant>`` (0-d tensors).

    The variants are stacked into one batch so the feature arithmetic runs once.
    """
    if not variants:
        return {}
    tags = list(variants)
    sizes = [variants[t][0].shape[0] for t in tags]
    n_parts = len(variants[tags[0]])
    batch = [torch.cat([variants[t][k] for t in tags]) for k in range(n_parts)]
    values = features(*batch, **options)
    names = list(values)
    table = torch.stack([values[n] for n in names])  # [features, matrices]
    result: dict[str, torch.Tensor] = {}
    for tag, chunk in zip(tags, table.split(sizes, dim=1), strict=True):
        for name, mean in zip(names, nanmean(chunk).unbind(), strict=True):
            result[f"{prefix}_{name}_{tag}"] = mean
    return result


def nanmean(values: torch.Tensor) -> torch.Tensor:
    """Mean of the finite entries along the last axis; NaN where there are none."""
    finite = torch.isfinite(values)
    count = finite.sum(-1)
    total = torch.where(finite, values, torch.zeros_like(values)).sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
