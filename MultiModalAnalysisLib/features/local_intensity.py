"""Local intensity features, IBSI 1 section 3.2: local and global intensity peaks.

The mean intensity in a 1 cm^3 sphere around each voxel is a convolution with a ball,
done with FFTs (one per image, whatever the sphere's size in voxels), divided by the
number of sphere voxels inside the image so the mean covers only real voxels. Every image
voxel counts, inside the ROI or not, as IBSI defines it.
"""

from __future__ import annotations

import math

import torch
from scipy.fft import next_fast_len

from MultiModalAnalysisLib.features.roi import PEAK_RADIUS_MM, RegionOfInterest, bounding_box


def local_means(
    image: torch.Tensor, spacing: tuple[float, float, float], where: torch.Tensor
) -> torch.Tensor:
    """Mean intensity within :data:`PEAK_RADIUS_MM` of each voxel centre selected by ``where``.

    The mean covers the sphere's voxels inside ``image``: where every selected voxel's
    sphere lies inside, that is the sphere's voxel count, and only near the edge does it
    need a second convolution (of ones).
    """
    reach = [int(math.floor(PEAK_RADIUS_MM / s)) for s in spacing]
    axes = [
        torch.arange(-r, r + 1, dtype=torch.float64, device=image.device) * s
        for r, s in zip(reach, spacing, strict=True)
    ]
    dz, dy, dx = torch.meshgrid(*axes, indexing="ij")
    ball = ((dz**2 + dy**2 + dx**2) <= PEAK_RADIUS_MM**2 + 1e-9).to(torch.float64)
    sums = _convolve(image.to(torch.float64), ball, reach)[where]
    selected = bounding_box(where)
    clear = all(
        part.start >= r and part.stop <= n - r
        for part, r, n in zip(selected, reach, image.shape, strict=True)
    )
    if clear:
        return sums / ball.sum()
    counts = _convolve(torch.ones_like(image, dtype=torch.float64), ball, reach)[where]
    return sums / counts.clamp(min=0.5)


def _convolve(volume: torch.Tensor, kernel: torch.Tensor, reach: list[int]) -> torch.Tensor:
    """Zero-padded 'same' convolution of a volume with a symmetric kernel, via FFT."""
    # linear (not circular) convolution needs n + 2r; a 5-smooth size keeps the FFT fast
    shape = [next_fast_len(n + 2 * r, real=True) for n, r in zip(volume.shape, reach, strict=True)]
    spectrum = torch.fft.rfftn(volume, s=shape) * torch.fft.rfftn(kernel, s=shape)
    full = torch.fft.irfftn(spectrum, s=shape)
    z, y, x = volume.shape
    rz, ry, rx = reach
    return full[rz : rz + z, ry : ry + y, rx : rx + x]


def local_intensity_feature_values(roi: RegionOfInterest) -> dict[str, torch.Tensor]:
    """``loc_peak_loc`` (peak around the hottest voxel) and ``loc_peak_glob`` (highest peak)."""
    means = local_means(roi.image, roi.spacing, roi.intensity_mask)
    values = roi.values
    hottest = values == values.max()
    return {"loc_peak_loc": means[hottest].max(), "loc_peak_glob": means.max()}
