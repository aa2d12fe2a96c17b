"""Grey level run length matrix (GLRLM) features, IBSI 1 section 3.7.

Runs are found without a loop over voxels or lines. In the zero-padded volume, flattened,
a step along direction ``d`` is a fixed index step ``F``; laying the flat array out as
``[K, F]`` and transposing puts every line along ``d`` in one row, lines separated by
padding zeros. All directions' rows go one after another into one 1-D tensor, where a run
starts where the value changes and ends where the next one differs; starts and ends
alternate, so the k-th start pairs with the k-th end.
"""

from __future__ import annotations

import numpy as np
import torch

from MultiModalAnalysisLib.features.aggregation import compute_variants, directional_variants
from MultiModalAnalysisLib.features.matrix_features import grey_count_features, rename
from MultiModalAnalysisLib.features.neighbours import pad, unique_directions

IBSI_NAMES = {
    "short": "sre", "long": "lre", "low": "lgre", "high": "hgre", "short_low": "srlge",
    "short_high": "srhge", "long_low": "lrlge", "long_high": "lrhge", "glnu": "glnu",
    "glnu_norm": "glnu_norm", "jnu": "rlnu", "jnu_norm": "rlnu_norm", "perc": "r_perc",
    "gl_var": "gl_var", "j_var": "rl_var", "j_entr": "rl_entr",
}  # fmt: skip


def _line_layout(
    grey: torch.Tensor, directions: list[tuple[int, int, int]]
) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
    """Every direction's lines, one after another, in one 1-D tensor.

    Returns the lines, and per direction its first position, its flat step and its number
    of rows (to map a position back to a voxel).
    """
    # grey levels fit in 16 bits: a quarter of the memory traffic of int64 for the copies
    small = grey.to(torch.int16) if int(grey.max()) < 2**15 else grey
    flat = pad(small, 1).reshape(-1)
    _, y, x = (n + 2 for n in grey.shape)
    steps = [(d[0] * y + d[1]) * x + d[2] for d in directions]
    rows = [-(-flat.numel() // step) for step in steps]
    starts = [0]
    for step, n_rows in zip(steps, rows, strict=True):
        starts.append(starts[-1] + step * n_rows)
    lines = torch.zeros(starts[-1], dtype=flat.dtype, device=flat.device)
    for step, n_rows, first in zip(steps, rows, starts, strict=False):
        extended = torch.nn.functional.pad(flat, (0, step * n_rows - flat.numel()))
        lines[first : first + step * n_rows].view(step, n_rows).copy_(
            extended.view(n_rows, step).t()
        )
    return lines, starts[:-1], steps, rows


def find_runs(
    grey: torch.Tensor, directions: list[tuple[int, int, int]], with_slice: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Every run along every (lexicographically positive) direction.

    Returns:
        Each run's grey level, length, direction number and (``with_slice``) the axial
        slice it starts in.
    """
    lines, firsts, steps, rows = _line_layout(grey, directions)
    starts, ends = _run_bounds(lines)
    lengths = ends - starts + 1
    device = grey.device
    first_of = torch.tensor(firsts, device=device)
    per_direction = torch.diff(
        torch.searchsorted(starts, torch.tensor([*firsts, lines.numel()], device=device))
    )
    direction = torch.repeat_interleave(torch.arange(len(directions), device=device), per_direction)
    levels = lines[starts].to(torch.int64)
    if not with_slice:
        return levels, lengths, direction, None
    # position q of a direction's lines holds flat[(q % rows) * step + q // rows]
    q = starts - first_of[direction]
    n_rows = torch.tensor(rows, device=device)[direction]
    step = torch.tensor(steps, device=device)[direction]
    origin = torch.remainder(q, n_rows) * step + torch.div(q, n_rows, rounding_mode="floor")
    _, y, x = (n + 2 for n in grey.shape)
    return levels, lengths, direction, torch.div(origin, y * x, rounding_mode="floor") - 1


def _run_bounds(lines: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions where runs start and end in the 1-D ``lines`` (0 = outside, never a run).

    On the CPU the comparisons run in numpy on the same memory: torch's CPU comparison
    kernels (tensor -> bool) are about ten times slower here and dominated the GLRLM.
    """
    if lines.device.type == "cpu":
        values = lines.numpy()
        changed = values[1:] != values[:-1]
        starts = np.flatnonzero(changed & (values[1:] != 0)) + 1
        ends = np.flatnonzero(changed & (values[:-1] != 0))
        return torch.from_numpy(starts), torch.from_numpy(ends)
    changed = lines[1:] != lines[:-1]
    starts = torch.nonzero(changed & (lines[1:] != 0)).squeeze(1) + 1
    ends = torch.nonzero(changed & (lines[:-1] != 0)).squeeze(1)
    return starts, ends


def run_length_counts(
    grey: torch.Tensor, n_levels: int, directions: list[tuple[int, int, int]], by_slice: bool
) -> torch.Tensor:
    """Run counts ``[slices, directions, Ng, L]`` or ``[directions, Ng, L]`` (L: longest run).

    With ``by_slice`` each run is filed under the slice it starts in.
    """
    slices = grey.shape[0] if by_slice else 1
    longest = max(grey.shape)
    levels, lengths, direction, start_slice = find_runs(grey, directions, by_slice)
    matrix = direction if start_slice is None else start_slice * len(directions) + direction
    keys = (matrix * n_levels + levels - 1) * longest + lengths - 1
    counts = torch.bincount(keys, minlength=slices * len(directions) * n_levels * longest)
    counts = counts.view(slices, len(directions), n_levels, longest)
    return counts if by_slice else counts[0]


def glrlm_feature_values(
    grey: torch.Tensor, n_levels: int, aggregation: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Every GLRLM feature for the requested aggregation levels."""
    per_slice_voxels = (grey > 0).sum((1, 2))
    per_slice = volume = None
    if "2D" in aggregation or "2.5D" in aggregation:
        in_plane = run_length_counts(grey, n_levels, unique_directions(True), True)
        voxels_2d = per_slice_voxels.view(-1, 1).expand(-1, in_plane.shape[1])
        per_slice = (in_plane, voxels_2d)
    if "3D" in aggregation:
        counts_3d = run_length_counts(grey, n_levels, unique_directions(False), False)
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
