"""Grey level run length matrix (GLRLM) features, IBSI 1 section 3.7.

Runs are found without a loop over voxels: along a direction, a voxel starts a run when
the voxel before it is outside the ROI or has another grey level, and ends one when the
voxel after it does. Within a line starts and ends alternate, so sorting both by (line,
position) pairs them; the run length is the difference of positions plus one.
"""

from __future__ import annotations

import torch

from MultiModalAnalysisLib.features.aggregation import compute_variants, directional_variants
from MultiModalAnalysisLib.features.matrix_features import grey_count_features, rename
from MultiModalAnalysisLib.features.neighbours import (
    out_of_plane_directions,
    pad,
    shifted,
    unique_directions,
)

IBSI_NAMES = {
    "short": "sre", "long": "lre", "low": "lgre", "high": "hgre", "short_low": "srlge",
    "short_high": "srhge", "long_low": "lrlge", "long_high": "lrhge", "glnu": "glnu",
    "glnu_norm": "glnu_norm", "jnu": "rlnu", "jnu_norm": "rlnu_norm", "perc": "r_perc",
    "gl_var": "gl_var", "j_var": "rl_var", "j_entr": "rl_entr",
}  # fmt: skip


def runs_along(
    grey: torch.Tensor, direction: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every run along ``direction``: its grey level, length and the slice it starts in."""
    padded = pad(grey, 1)
    before = shifted(padded, tuple(-c for c in direction), 1)
    after = shifted(padded, direction, 1)
    inside = grey > 0
    starts = torch.nonzero(inside & (before != grey))
    ends = torch.nonzero(inside & (after != grey))
    start_key, start_pos = _line_position(starts, direction, grey.shape)
    end_key, end_pos = _line_position(ends, direction, grey.shape)
    start_order = torch.argsort(start_key)
    end_order = torch.argsort(end_key)
    lengths = end_pos[end_order] - start_pos[start_order] + 1
    first = starts[start_order]
    levels = grey[first[:, 0], first[:, 1], first[:, 2]]
    return levels, lengths, first[:, 0]


def _line_position(
    points: torch.Tensor, direction: tuple[int, int, int], shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sort key (line, position) and the position along the line of each point."""
    sizes = torch.tensor(shape, device=points.device)
    step = torch.tensor(direction, device=points.device)
    # steps back to where the line enters the volume, per moving axis
    back = torch.where(step > 0, points, sizes - 1 - points)
    back = torch.where(step != 0, back, torch.full_like(back, torch.iinfo(torch.int64).max))
    position = back.min(1).values
    entry = points - position.unsqueeze(1) * step
    line = (entry[:, 0] * shape[1] + entry[:, 1]) * shape[2] + entry[:, 2]
    return line * (max(shape) + 1) + position, position


def run_length_counts(
    grey: torch.Tensor, n_levels: int, directions: list[tuple[int, int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run counts ``[slices, directions, Ng, L]`` (L = longest possible run), and lengths 1..L."""
    slices = grey.shape[0]
    longest = max(grey.shape)
    keys = []
    for number, direction in enumerate(directions):
        levels, lengths, start_slice = runs_along(grey, direction)
        keys.append(
            ((start_slice * len(directions) + number) * n_levels + levels - 1) * longest
            + lengths
            - 1
        )
    size = slices * len(directions) * n_levels * longest
    counts = torch.bincount(torch.cat(keys), minlength=size)
    return counts.view(slices, len(directions), n_levels, longest)


def glrlm_feature_values(
    grey: torch.Tensor, n_levels: int, aggregation: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Every GLRLM feature for the requested aggregation levels."""
    in_plane = run_length_counts(grey, n_levels, unique_directions(True))
    per_slice_voxels = (grey > 0).sum((1, 2))
    n_in = in_plane.shape[1]
    voxels_2d = per_slice_voxels.view(-1, 1).expand(-1, n_in)
    per_slice = volume = None
    if "2D" in aggregation or "2.5D" in aggregation:
        per_slice = (in_plane, voxels_2d)
    if "3D" in aggregation:
        across = run_length_counts(grey, n_levels, out_of_plane_directions())
        counts_3d = torch.cat([in_plane.sum(0), across.sum(0)])
        voxels_3d = per_slice_voxels.sum().expand(counts_3d.shape[0])
        volume = (counts_3d, voxels_3d)
    variants = directional_variants(per_slice, volume)
    variants = {k: v for k, v in variants.items() if _wanted(k, aggregation)}
    # keep only run lengths that occur: matrices stay small for long axes
    lengths_used = torch.nonzero(
        torch.stack([v[0].sum(tuple(range(v[0].dim() - 1))) for v in variants.values()]).sum(0)
    ).view(-1)
    lengths = (lengths_used + 1).to(torch.float64)
    trimmed = {k: [v[0][..., lengths_used], v[1]] for k, v in variants.items()}
    return compute_variants(trimmed, _features, "rlm", lengths=lengths)


def _features(counts, n_voxels, lengths):
    return rename(grey_count_features(counts, n_voxels, lengths), IBSI_NAMES)


def _wanted(tag: str, aggregation: tuple[str, ...]) -> bool:
    level = {"2D": "2D", "2_5D": "2.5D", "3D": "3D"}[tag.rsplit("_", 1)[0]]
    return level in aggregation
