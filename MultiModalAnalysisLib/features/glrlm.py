"""Grey level run length matrix (GLRLM) features, IBSI 1 section 3.7.

Runs are found without a loop over voxels or lines. In the zero-padded volume, flattened,
a step along direction ``d`` is a fixed index step ``F``; laying the flat array out as
``[K, F]`` and transposing puts every line along ``d`` in one row, lines separated by
padding zeros. Along those rows a run starts where the value changes and ends where the
next one differs; starts and ends alternate, so the k-th start pairs with the k-th end.

The run lists are index bookkeeping over about a million entries, not arithmetic: they are
built with numpy on the host (3-5 times faster than torch's CPU kernels here, whose large
temporaries are costly to allocate) from the small grey-level volume, and only the count
matrices go to the torch device for the feature arithmetic, as for the zone labelling.
"""

from __future__ import annotations

from collections.abc import Iterator

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


def find_runs(
    grey: np.ndarray, directions: list[tuple[int, int, int]], with_slice: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Every run along each (lexicographically positive) direction, one direction at a time.

    Args:
        grey: grey levels (0 outside the ROI), ``[z, y, x]``.

    Yields:
        Per direction: each run's grey level, length and (``with_slice``) the axial slice
        it starts in.
    """
    flat = np.pad(grey, 1).reshape(-1)
    _, y, x = (n + 2 for n in grey.shape)
    steps = [(d[0] * y + d[1]) * x + d[2] for d in directions]
    rows = [-(-flat.size // step) for step in steps]
    # one buffer for every direction's layout: a few MB, reused while it is in cache
    extended = np.zeros(max(s * r for s, r in zip(steps, rows, strict=True)), flat.dtype)
    extended[: flat.size] = flat
    lines = np.empty_like(extended)
    for step, n_rows in zip(steps, rows, strict=True):
        size = step * n_rows
        line = lines[:size]
        line.reshape(step, n_rows)[...] = extended[:size].reshape(n_rows, step).T
        # where the value changes: a run ends just before, or starts just after (or both)
        change = np.flatnonzero(line[1:] != line[:-1])
        starts = change[line[change + 1] != 0] + 1
        ends = change[line[change] != 0]
        slices = None
        if with_slice:
            # position q of the lines holds flat[(q % rows) * step + q // rows]
            origin = (starts % n_rows) * step + starts // n_rows
            slices = origin // (y * x) - 1
        yield line[starts], ends - starts + 1, slices


def run_length_counts(
    grey: torch.Tensor, n_levels: int, directions: list[tuple[int, int, int]], by_slice: bool
) -> torch.Tensor:
    """Run counts ``[slices, directions, Ng, L]`` or ``[directions, Ng, L]`` (L: longest run).

    With ``by_slice`` each run is filed under the slice it starts in.
    """
    slices = grey.shape[0] if by_slice else 1
    longest = max(grey.shape)
    # grey levels usually fit in 8 bits: an eighth of the memory traffic of int64
    host = grey.cpu().numpy().astype(np.uint8 if n_levels < 2**8 else np.int64)
    size = n_levels * longest
    counts = np.zeros((slices, len(directions), size), np.int64)
    runs = find_runs(host, directions, by_slice)
    for number, (levels, lengths, start_slice) in enumerate(runs):
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
