"""MIND-SSC: modality-independent neighbourhood descriptors (Heinrich et al., MICCAI 2013).

Each voxel gets 12 numbers describing how similar small patches around it are to each
other (the self-similarity context); the descriptor is the same for CT and MR of the same
anatomy, so two modalities can be compared by a plain squared difference. Written here
because MONAI has no MIND implementation.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

# The 6 face neighbours of a voxel; MIND-SSC compares the patches at every pair of them
# that are sqrt(2) apart (12 pairs).
_NEIGHBOURS = torch.tensor(
    [[0, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 2], [2, 1, 1], [1, 2, 1]], dtype=torch.long
)


def _pairs() -> tuple[torch.Tensor, torch.Tensor]:
    first, second = [], []
    for i, j in itertools.combinations(range(6), 2):
        if int(((_NEIGHBOURS[i] - _NEIGHBOURS[j]) ** 2).sum()) == 2:
            first.append(_NEIGHBOURS[i])
            second.append(_NEIGHBOURS[j])
    return torch.stack(first), torch.stack(second)


def _shift_kernels(offsets: torch.Tensor) -> torch.Tensor:
    kernels = torch.zeros(len(offsets), 1, 3, 3, 3)
    for k, (z, y, x) in enumerate(offsets.tolist()):
        kernels[k, 0, z, y, x] = 1.0
    return kernels


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors of a volume.

    Args:
        image: (1, 1, D, H, W) tensor.
        radius: half-size of the patches (box filter) compared, in voxels.
        dilation: distance between the neighbours compared, in voxels.

    Returns:
        (1, 12, D, H, W) tensor of descriptors in (0, 1].
    """
    first, second = _pairs()
    dtype, device = image.dtype, image.device
    pad = dilation
    padded = F.pad(image, [pad] * 6, mode="replicate")
    shifted_a = F.conv3d(padded, _shift_kernels(first).to(device, dtype), dilation=dilation)
    shifted_b = F.conv3d(padded, _shift_kernels(second).to(device, dtype), dilation=dilation)
    distance = (shifted_a - shifted_b) ** 2
    size = 2 * radius + 1
    distance = F.avg_pool3d(F.pad(distance, [radius] * 6, mode="replicate"), size, stride=1)
    distance = distance - distance.min(dim=1, keepdim=True).values
    variance = distance.mean(dim=1, keepdim=True)
    variance = variance.clamp(min=variance.mean() * 1e-3, max=variance.mean() * 1e3)
    descriptor = torch.exp(-distance / variance)
    return descriptor / descriptor.max(dim=1, keepdim=True).values.clamp(min=1e-6)
