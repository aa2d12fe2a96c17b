"""Grey level run length matrix (GLRLM) features, IBSI 1 section 3.7.

Runs are found without a loop over voxels or lines. In the zero-padded volume, flattened,
a step along direction ``d`` is a fixed index step ``F``; laying the flat array out as
``[K, F]`` and transposing puts every line along ``d`` in one row, lines separated by
padding zeros. All directions' rows go one after another into one 1-D array, where a run
starts where the value changes and ends where the next one differs; starts and ends
alternate, so the k-th start pairs with the k-th end.

The run lists are index bookkeeping over about a million entries, not arithmetic: they are
built with numpy on the host (3-5 times faster than torch's CPU kernels here, whose large
temporaries are costly to allocate) from the small grey-level volume, and only the count
matrices go to the torch device for the feature arithmetic, as for the zone labelling.
"""

from __future__ import annotations

import numpy as np
import torch

from MultiModalAnalysisLib.features.aggregation import compute_variants, directional_variants
from MultiModalAnalysisLib.features.matrix_features import grey_count_features, rename
from MultiModalAnalysisLib.features.neighbours import unique_directions

IBSI_NAMES = {
    "short": "sre", "long": "lre", "low": "lgre", "high": "hgre", "short_low": "srlge",
    "short_high": "srhge", "long_low": "lrlge", "long_high": "lrhge", "glnu": "glnu",
    "glnu_norm": "glnu_norm", "jnu": "rlnu", "jnu_norm": "rlnu_norm", "perc": "r_perc",
    "gl_var": "gl_var", "j_var": "rl_var", "j_entr": "rl_entr",
}  # fmt: skip


def _line_layout(
    grey: np.ndarray, directions: list[tuple[int, int, int]]
) -> tuple[np.ndarray, list[int], list[int], list[int]]:
    """Every direction's lines, one after another, in one 1-D array.

    Returns the lines, and per direction its first position, its flat step and its number
    of rows (to map a position back to a voxel).
    """
    flat = np.pad(grey, 1).reshape(-1)
    _, y, x = (n + 2 for n in grey.shape)
    steps = [(d[0] * y + d[1]) * x + d[2] for d in directions]
    rows = [-(-flat.size // step) for step in steps]
    firsts = np.concatenate([[0], np.cumsum([s * r for s, r in zip(steps, rows, strict=True)])])
    lines = np.zeros(int(firsts[-1]), dtype=flat.dtype)
    extended = np.zeros(max(s * r for s, r in zip(steps, rows, strict=True)), flat.dtype)
    extended[: flat.size] = flat
    for step, n_rows, first in zip(steps, rows, firsts, strict=False):
        block = extended[: step * n_rows].reshape(n_rows, step)
        lines[first : first + step * n_rows].reshape(step, n_rows)[...] = block.T
    return lines, firsts[:-1].tolist(), steps, rows


def find_runs(
    grey: np.ndarray, directions: list[tuple[int, int, int]], with_slice: bool = True
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Every run along every (lexicographically positive) direction.

    Args:
        grey: grey levels (0 outside the ROI), ``[z, y, x]``.

    Returns:
        Per direction: each run's grey level, length and (``with_slice``) the axial slice
        it starts in.
    """
    lines, firsts, steps, rows = _line_layout(grey, directions)
    # where the value changes: a run ends just before, or starts just after (or both)
    change = np.flatnonzero(lines[1:] != lines[:-1])
    starts = change[lines[change + 1] != 0] + 1
    ends = change[lines[change] != 0]
    bounds = np.searchsorted(starts, [*firsts, lines.size])
    _, y, x = (n + 2 for n in grey.shape)
    runs = []
    for number, (first, step, n_rows) in enumerate(zip(firsts, steps, rows, strict=True)):
        begin, stop = (
            starts[bounds[number] : bounds[number + 1]],
            ends[bounds[number] : bounds[number + 1]],
        )
        slices = None
        if with_slice:
            # position q of a direction's lines holds flat[(q % rows) * step + q // rows]
            q = begin - first
            slices = ((q % n_rows) * step + q // n_rows) // (y * x) - 1
        runs.append((lines[begin], stop - begin + 1, slices))
    return runs


def run_length_counts(
    grey: torch.Tensor, n_levels: int, directions: list[tuple[int, int, int]], by_slice: bool
) -> torch.Tensor:
    """Run counts ``[slices, directions, Ng, L]`` or ``[directions, Ng, L]`` (L: longest run).

    With ``by_slice`` each run is filed under the slice it starts in.
    """
    slices = grey.shape[0] if by_slice else 1
    longest = max(grey.shape)
    # grey levels fit in 16 bits: a quarter of the memory traffic of int64 for the copies
    host = grey.cpu().numpy().astype(np.int16 if n_levels < 2**15 else np.int64)
    size = n_levels * longest
    counts = np.zeros((slices, len(directions), size), np.int64)
    for number, (levels, lengths, start_slice) in enumerate(find_runs(host, directions, by_slice)):
        keys = (levels.astype(np.int64) - 1) * longest + lengths - 1
        if start_slice is None:
            counts[0, number] = np.bincount(keys, minlength=size)
        else:
            flat = np.bincount(start_slice * size + keys, minlength=slices * size)
            counts[:, number] = flat.reshape(slices, size)
    counts = torch.as_tensor(counts, device=grey.device)
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
