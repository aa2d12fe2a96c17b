"""Dense diffeomorphic registration in torch (CPU or CUDA): a stationary velocity field
integrated by scaling and squaring, optimised coarse to fine.

Design:
- The images live on isotropic working grids (one per level) over the fixed image, made
  in torch on the stage's device (``level_image``); the moving image, smoothed the same way
  on its own grid, is resampled once per level through the linear transform found before, so
  the optimisation only looks for the residual displacement ``u``: the result is
  ``T(x) = L(x + u(x))``.
- The velocity field lives on a grid ``velocity_factor`` times coarser than the images
  (smooth by construction and cheap to integrate); it is integrated by scaling and
  squaring (``ScalingAndSquaring``: MONAI's ``DVF2DDF`` computation, written here because
  MONAI 1.6.1's ``Warp`` never reuses its reference grid: its cache compares the grid's
  shape without the batch axis against the field's without its channel axis, so the
  grid is rebuilt on the host and copied to the device at every squaring. That was
  2.5 s of the 4.9 s a 256^3 pair took on an H100), and the displacement is sampled where
  needed. The dense "lncc" path warps the moving image with ``VoxelWarp``, the same
  computation as ``Warp`` with its grid built once, for the same reason.
- Cross-modal similarity is evaluated on random samples drawn anew at every iteration
  (stochastic gradient, as elastix does): MONAI's ``GlobalMutualInformationLoss`` ("mi"),
  or the squared difference of MIND-SSC descriptors ("mind"); within one modality, NCC on
  samples ("ncc") or MONAI's dense ``LocalNormalizedCrossCorrelationLoss`` ("lncc").
- The regulariser is the bending energy or the diffusion energy of the velocity in
  velocity-grid voxel units (``bending_energy``, ``diffusion_energy``): the formulas of
  MONAI 1.6.1's ``BendingEnergyLoss`` and ``DiffusionLoss``, written here because MONAI's
  fall short in two ways. Its bending energy changed stencil in 1.6.1 (wide ``[1, 0, -2, 0,
  1] / 4`` before, compact ``[1, -2, 1]`` since), so the same weight would regularise
  differently depending on the MONAI installed; and both index tensors with lists of
  slices, which torch deprecates (a warning at every run now, "an error or a different
  result" in a later torch).
The result is a SimpleITK displacement field on the finest working grid.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.device import cpu_threads
from MultiModalAnalysisLib.errors import ConfigError
from MultiModalAnalysisLib.preprocess.resample import antialias_sigmas, spacing_grid
from MultiModalAnalysisLib.progress import Progress, check_cancel
from MultiModalAnalysisLib.registration.transforms import displacement_field_transform

TORCH_METRICS = ("mi", "mind", "ncc", "lncc")
REGULARISERS = ("bending", "diffusion")


@dataclass(frozen=True)
class TorchDeformableSettings:
    """How the torch backend runs.

    Attributes:
        spacings_mm: image working-grid spacing per level, coarse to fine.
        velocity_factor: the velocity grid is this many times coarser than the image grid.
        iterations: Adam iterations per level.
        learning_rate_mm: Adam step size, in mm of velocity.
        regulariser: "bending" (second derivatives) or "diffusion" (first derivatives).
        weight: regulariser weight (against a similarity of order 1).
        samples: random samples per iteration for "mi", "mind" and "ncc".
        scaling_steps: squarings in the scaling-and-squaring integration.
        seed: random seed (sampling), for reproducible results.
    """

    spacings_mm: tuple[float, ...] = (6.0, 3.0)
    velocity_factor: int = 2
    iterations: tuple[int, ...] = (80, 60)
    learning_rate_mm: float = 0.5
    regulariser: str = "bending"
    weight: float = 2.0
    samples: int = 10000
    scaling_steps: int = 6
    seed: int = 20240611


@dataclass
class _Level:
    grid: sitk.Image  # the image working grid (float32 fixed image on it)
    fixed: object  # torch (1, 1, D, H, W) in [0, 1]
    moving: object  # torch (1, 1, D, H, W) in [0, 1], moving through L on the grid
    valid: object  # torch (1, 1, D, H, W): 1 where the moving image has data
    sample_index: object  # torch (N, 3) voxel indices (z, y, x) allowed as samples
    velocity_shape: tuple[int, int, int]
    fixed_mind: object = None
    moving_mind: object = None
    warp: object = None  # the dense "lncc" path's VoxelWarp, made on first use


def _normalised(array: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    values = array[valid > 0.5] if valid is not None and (valid > 0.5).any() else array
    low, high = np.percentile(values, [0.5, 99.5])
    return np.clip((array - low) / (high - low if high > low else 1.0), 0, 1).astype(np.float32)


def _axis_operator(size_in: int, spacing_in: float, size_out: int, spacing_out: float):
    """The ``(size_out, size_in)`` matrix that smooths one image axis with ``downsample``'s
    anti-aliasing Gaussian (sigma half the new spacing where it is coarser; kernel cut at 4
    sigma, edge voxels repeated) and then interpolates linearly at the voxel centres of
    ``spacing_grid`` along that axis; and which output voxels lie inside the input (ITK's
    rule: within half a voxel of its edge voxels' centres)."""
    sigma = float(antialias_sigmas([spacing_in], [spacing_out])[0]) / spacing_in
    smooth = np.eye(size_in)
    if sigma > 0:
        offsets = np.arange(-int(4 * sigma + 0.5), int(4 * sigma + 0.5) + 1)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
        smooth = np.zeros((size_in, size_in))
        columns = np.clip(np.arange(size_in)[:, None] + offsets, 0, size_in - 1)
        np.add.at(smooth, (np.repeat(np.arange(size_in), offsets.size), columns.ravel()),
                  np.tile(kernel / kernel.sum(), size_in))
    position = (np.arange(size_out) + 0.5) * spacing_out / spacing_in - 0.5
    inside = (position >= -0.5) & (position <= size_in - 0.5)
    low = np.floor(position).astype(int)
    fraction = position - low
    interpolate = np.zeros((size_out, size_in))
    rows = np.arange(size_out)
    np.add.at(interpolate, (rows, np.clip(low, 0, size_in - 1)), 1.0 - fraction)
    np.add.at(interpolate, (rows, np.clip(low + 1, 0, size_in - 1)), fraction)
    interpolate[~inside] = 0.0
    return interpolate @ smooth, inside


def level_image(image: sitk.Image, spacing, device) -> sitk.Image:
    """``image`` anti-aliased and resampled to ``spacing`` on ``spacing_grid``'s grid: what
    ``prepare.downsample`` computes (up to the shape of the Gaussian: a sampled kernel here,
    ITK's recursive approximation there), as one small matrix product per axis in torch on
    ``device``. On a GPU this takes the level building off the CPU, where ITK's Gaussian
    over a full-resolution 256^3 pair took 0.75 s of the stage's 2.3 s on an H100 machine;
    on the CPU it is also cheaper, since each product shrinks the volume for the next.
    Unchanged (the image itself) where ``spacing`` is the image's own within 2 %."""
    import torch

    old = np.array(image.GetSpacing(), dtype=float)
    new = np.array(spacing, dtype=float)
    if np.allclose(new, old, rtol=0.02):
        return image
    reference = spacing_grid(image, new)
    axes = [_axis_operator(int(n_in), float(s_in), int(n_out), float(s_out))
            for n_in, s_in, n_out, s_out in zip(image.GetSize(), old, reference.GetSize(), new,
                                                strict=True)]
    operators, inside = [a[0] for a in axes], [a[1] for a in axes]
    along_x, along_y, along_z = (torch.as_tensor(o, dtype=torch.float32, device=device)
                                 for o in operators)
    with warnings.catch_warnings():  # a read-only view of the image, only read here
        warnings.simplefilter("ignore", UserWarning)
        volume = torch.as_tensor(sitk.GetArrayViewFromImage(image), dtype=torch.float32,
                                 device=device)
    volume = volume @ along_x.T  # (z, y, x')
    volume = along_y @ volume  # (z, y', x')
    volume = torch.tensordot(along_z, volume, dims=1)  # (z', y', x')
    outside = ~(np.asarray(inside[2])[:, None, None] & np.asarray(inside[1])[None, :, None]
                & np.asarray(inside[0])[None, None, :])
    result = volume.cpu().numpy()
    if outside.any() and not outside.all():
        result[outside] = result[~outside].min()  # downsample's default: the minimum
    level = sitk.GetImageFromArray(np.ascontiguousarray(result, dtype=np.float32))
    level.CopyInformation(reference)
    return level


def _build_level(fixed: sitk.Image, moving: sitk.Image, linear: sitk.Transform,
                 fixed_mask: sitk.Image | None, moving_mask: sitk.Image | None,
                 spacing: float, settings: TorchDeformableSettings, metric: str, device):
    import torch

    grid = level_image(fixed, [spacing] * 3, device)
    source = level_image(moving, [max(spacing, s) for s in moving.GetSpacing()], device)
    moving_on_grid = sitk.Resample(source, grid, linear, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    valid_source = (sitk.Cast(moving_mask, sitk.sitkFloat32) if moving_mask is not None
                    else sitk.Image(source.GetSize(), sitk.sitkFloat32) + 1.0)
    if moving_mask is None:
        valid_source.CopyInformation(source)
    valid = sitk.Resample(valid_source, grid, linear, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    valid_array = sitk.GetArrayFromImage(valid)
    fixed_array = _normalised(sitk.GetArrayFromImage(grid))
    moving_array = _normalised(sitk.GetArrayFromImage(moving_on_grid), valid_array)
    allowed = np.ones(fixed_array.shape, bool)
    if fixed_mask is not None:
        allowed = sitk.GetArrayFromImage(sitk.Resample(
            fixed_mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
        if not allowed.any():
            allowed[:] = True
    size = np.array(fixed_array.shape)
    velocity_shape = tuple(int(math.ceil((n - 1) / settings.velocity_factor)) + 1 for n in size)
    velocity_shape = tuple(max(5, n) for n in velocity_shape)

    def tensor(array: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(array))[None, None].to(device)

    level = _Level(grid, tensor(fixed_array), tensor(moving_array), tensor(valid_array),
                   torch.from_numpy(np.argwhere(allowed)).to(device), velocity_shape)
    if metric == "mind":
        from MultiModalAnalysisLib.registration.mind import mind_ssc

        level.fixed_mind = mind_ssc(level.fixed)
        level.moving_mind = mind_ssc(level.moving)
    return level


class VoxelWarp:
    """Volumes ``(1, C, D, H, W)`` sampled at ``x + u(x)`` on one grid, ``u`` a ``(1, 3, D, H,
    W)`` displacement in voxels along z, y, x (bilinear): MONAI's ``Warp`` with the identity
    grid built once, where MONAI 1.6.1 rebuilds it on the host at every call."""

    def __init__(self, shape, device, padding_mode: str = "border") -> None:
        import torch

        shape = [int(n) for n in shape]
        self.identity = voxel_grid(shape, shape, device)
        # grid_sample wants (x, y, z) in [-1, 1]; the field's channels are (z, y, x) voxels
        self.scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape[::-1]],
                                  dtype=torch.float32, device=device)
        self.padding_mode = padding_mode

    def __call__(self, volume, displacement):
        import torch.nn.functional as F

        grid = self.identity + displacement.permute(0, 2, 3, 4, 1).flip(-1) * self.scale
        return F.grid_sample(volume, grid, mode="bilinear", padding_mode=self.padding_mode,
                             align_corners=True)


class ScalingAndSquaring:
    """The displacement of a stationary velocity field (both ``(1, 3, D, H, W)`` in voxels
    along z, y, x): ``u = v / 2^n``, then ``n`` times ``u <- u + u(x + u)`` (bilinear,
    border padding), as MONAI's ``DVF2DDF``, with the sampling grid built once."""

    def __init__(self, shape, steps: int, device) -> None:
        self.steps = int(steps)
        self.warp = VoxelWarp(shape, device, "border")

    def __call__(self, velocity):
        displacement = velocity / (2 ** self.steps)
        for _ in range(self.steps):
            displacement = displacement + self.warp(displacement, displacement)
        return displacement


class _Deformation:
    """Velocity (parameter) -> displacement on the image grid, by scaling and squaring."""

    def __init__(self, grid: sitk.Image, velocity_shape, image_shape, spacing: float,
                 factor: int, steps: int, device) -> None:
        import torch

        self.integrate = ScalingAndSquaring(velocity_shape, steps, device)
        self.origin = np.array(grid.GetOrigin())  # shared by the image and velocity grids
        self.direction = np.array(grid.GetDirection()).reshape(3, 3)
        self.image_shape = tuple(int(n) for n in image_shape)
        self.velocity_shape = velocity_shape
        self.velocity_spacing = spacing * factor
        self.image_spacing = spacing
        self.device = device
        self.velocity = torch.zeros((1, 3, *velocity_shape), device=device, requires_grad=True)
        # image voxel index -> velocity-grid voxel index (both grids share the origin)
        self.to_velocity = spacing / self.velocity_spacing
        self._dense_grid = None  # the image voxels on the velocity grid, made on first use

    def displacement_mm(self):
        """(1, 3, Dv, Hv, Wv) displacement in mm along the grid axes (z, y, x)."""
        return self.integrate(self.velocity / self.velocity_spacing) * self.velocity_spacing

    def sample(self, field, points):
        """Values of a (1, C, Dv, Hv, Wv) velocity-grid field at image voxel points (N, 3)."""
        import torch.nn.functional as F

        coords = points * self.to_velocity
        scale = [2.0 / max(n - 1, 1) for n in self.velocity_shape]
        normalised = torch_stack_xyz(coords, scale)
        out = F.grid_sample(field, normalised.view(1, -1, 1, 1, 3), mode="bilinear",
                            padding_mode="border", align_corners=True)
        return out.view(field.shape[1], -1).t()  # (N, C)

    def dense_mm(self):
        """(1, 3, D, H, W) displacement in mm on the image grid."""
        if self._dense_grid is None:
            self._dense_grid = voxel_grid(self.image_shape, self.velocity_shape, self.device,
                                          self.to_velocity)
        return _on_grid(self.displacement_mm(), self._dense_grid)

    def upsample_to(self, other: _Deformation) -> None:
        """Initialise ``other`` (a finer level) with this level's velocity."""
        import torch

        # The levels' grids start half a voxel apart (each keeps the outer edge of the
        # volume), so the finer velocity nodes sit at an offset on this level's grid.
        offset = self.direction.T @ (other.origin - self.origin) / self.velocity_spacing
        grid = voxel_grid(other.velocity_shape, self.velocity_shape, self.device,
                          other.velocity_spacing / self.velocity_spacing, offset[::-1])
        with torch.no_grad():
            other.velocity.copy_(_on_grid(self.velocity, grid))


def voxel_grid(shape, volume_shape, device, step: float = 1.0,
               offset_zyx=(0.0, 0.0, 0.0)):
    """``grid_sample`` coordinates ``(1, *shape, 3)``, in a volume of ``volume_shape``
    voxels, of the points ``index * step + offset`` (voxels of that volume) of a grid of
    ``shape``. The volume may extend past that grid (e.g. a velocity grid a little larger
    than the image it covers), so sampling there is not an interpolate-to-size."""
    import torch

    axes = [torch.arange(int(n), device=device, dtype=torch.float32) * step + float(o)
            for n, o in zip(shape, offset_zyx, strict=True)]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).view(-1, 3)
    scale = [2.0 / max(n - 1, 1) for n in volume_shape]
    return torch_stack_xyz(points, scale).view(1, *[int(n) for n in shape], 3)


def _on_grid(field, grid):
    """A (1, C, D, H, W) field sampled at ``voxel_grid`` coordinates (bilinear, edge values
    beyond the field)."""
    import torch.nn.functional as F

    return F.grid_sample(field, grid, mode="bilinear", padding_mode="border",
                         align_corners=True)


def torch_stack_xyz(points_zyx, scale_zyx):
    """Voxel points (N, 3) in (z, y, x) -> grid_sample coordinates (x, y, z) in [-1, 1]."""
    import torch

    return torch.stack([points_zyx[:, 2] * scale_zyx[2] - 1, points_zyx[:, 1] * scale_zyx[1] - 1,
                        points_zyx[:, 0] * scale_zyx[0] - 1], dim=-1)


def _sample_image(volume, points_zyx):
    """Trilinear values of a (1, C, D, H, W) volume at voxel points (N, 3); zero outside."""
    import torch.nn.functional as F

    shape = volume.shape[2:]
    scale = [2.0 / max(n - 1, 1) for n in shape]
    grid = torch_stack_xyz(points_zyx, scale).view(1, -1, 1, 1, 3)
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.view(volume.shape[1], -1).t()


def _similarity_loss(metric: str, level: _Level, deformation: _Deformation, generator,
                     samples: int, losses):
    import torch

    if metric == "lncc":
        if level.warp is None:
            level.warp = VoxelWarp(level.fixed.shape[2:], level.fixed.device, "zeros")
        warped = level.warp(level.moving, deformation.dense_mm() / deformation.image_spacing)
        return losses["lncc"](warped, level.fixed)
    count = level.sample_index.shape[0]
    pick = torch.randint(0, count, (min(samples, count),), generator=generator)
    points = level.sample_index[pick.to(level.sample_index.device)].float()
    points = points + (torch.rand(points.shape, generator=generator).to(points.device) - 0.5)
    displacement = deformation.sample(deformation.displacement_mm(), points)
    target = points + displacement / deformation.image_spacing
    valid = _sample_image(level.valid, target)[:, 0] > 0.99
    if int(valid.sum()) < 100:
        return None
    if metric == "mind":
        fixed = _sample_image(level.fixed_mind, points)[valid]
        moving = _sample_image(level.moving_mind, target)[valid]
        return ((fixed - moving) ** 2).mean()
    fixed = _sample_image(level.fixed, points)[valid, 0]
    moving = _sample_image(level.moving, target)[valid, 0]
    if metric == "ncc":
        f = fixed - fixed.mean()
        m = moving - moving.mean()
        return -(f * m).sum() / torch.sqrt((f * f).sum() * (m * m).sum() + 1e-8)
    return losses["mi"](moving.view(1, 1, -1), fixed.view(1, 1, -1))


def _shifted(field, shifts: dict[int, int]):
    """``field`` (B, C, spatial...) with every spatial axis cut to its inner voxels
    (``1:-1``), except the axes in ``shifts``: one voxel up (+1) or down (-1) instead."""
    cut = {0: slice(1, -1), 1: slice(2, None), -1: slice(None, -2)}
    return field[(slice(None), slice(None))
                 + tuple(cut[shifts.get(axis, 0)] for axis in range(2, field.ndim))]


def _check_field(field) -> None:
    if field.ndim not in (3, 4, 5) or field.shape[1] != field.ndim - 2:
        raise ValueError(f"expected a (B, C, spatial...) field with one component per "
                         f"spatial axis, got shape {tuple(field.shape)}.")
    if min(field.shape[2:]) <= 2:
        raise ValueError(f"every spatial size must be > 2, got {tuple(field.shape[2:])}.")


def bending_energy(field):
    """Mean over the inner voxels and the components of ``sum_ij (d2 u / dx_i dx_j)^2``
    (voxel units; central differences: ``[1, -2, 1]`` for pure, the 4-point stencil / 4 for
    mixed derivatives, each mixed pair counted twice): the value of MONAI 1.6.1's
    ``BendingEnergyLoss()``, to rounding. The mixed derivatives are differences of the
    central differences, taken once per axis: 43 tensor operations forward and backward
    instead of the 100 of stencil by stencil. That matters where each is a kernel launch (a
    GPU, 140 iterations of a small field: 0.17 -> 0.10 s of the 256^3 stage on an H100).
    """
    import torch

    _check_field(field)
    spatial = range(2, field.ndim)

    def along(axis: int, cut: slice, tensor):
        return tensor[(slice(None),) * axis + (cut,)]

    def inner_except(axes, tensor):  # cut every other spatial axis to its inner voxels
        return tensor[(slice(None), slice(None)) + tuple(
            slice(None) if axis in axes else slice(1, -1) for axis in spatial)]

    central = {a: along(a, slice(2, None), field) - along(a, slice(None, -2), field)
               for a in spatial[:-1]}  # the mixed pairs' first axes
    energy = None
    for a in spatial:
        pure = inner_except((a,), torch.diff(field, n=2, dim=a)).square()
        energy = pure if energy is None else energy + pure
        for b in range(a + 1, field.ndim):
            mixed = along(b, slice(2, None), central[a]) - along(b, slice(None, -2), central[a])
            energy = energy + inner_except((a, b), mixed).square() * 0.125  # 2 (c / 4)^2
    return energy.mean()


def diffusion_energy(field):
    """Mean over the inner voxels and the components of ``sum_i (du / dx_i)^2`` (voxel
    units, central differences). As MONAI's ``DiffusionLoss()``."""
    _check_field(field)
    energy = None
    for a in range(2, field.ndim):
        gradient = (_shifted(field, {a: 1}) - _shifted(field, {a: -1})) / 2.0
        energy = gradient ** 2 if energy is None else energy + gradient ** 2
    return energy.mean()


def warm_up() -> None:
    """Load what the first deformable registration of a process would load on the way:
    MONAI (about 2.7 s on a 2-core CPU) and torch's optimiser machinery (the first
    ``torch.optim.Adam`` imports ``torch._dynamo``, about 1.5 s). Optional: call it ahead
    (e.g. while the user chooses images) so the registration itself starts at once."""
    import monai.losses  # noqa: F401
    import monai.networks.blocks  # noqa: F401
    import torch

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def register_deformable_torch(
    fixed: sitk.Image,
    moving: sitk.Image,
    linear: sitk.Transform,
    metric: str,
    *,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    settings: TorchDeformableSettings | None = None,
    device="cpu",
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> sitk.DisplacementFieldTransform:
    """Optimise a diffeomorphic displacement ``u`` with ``T(x) = linear(x + u(x))``.

    Args:
        fixed, moving: float32 registration images (see ``prepare.registration_image``).
        linear: the fixed -> moving linear transform found before.
        metric: "mi", "mind", "ncc" or "lncc".
        fixed_mask: where similarity is measured (fixed grid).
        moving_mask: where the moving image has valid data.
        settings: see :class:`TorchDeformableSettings`.
        device: a resolved torch device.

    Returns:
        The displacement-field transform ``x -> x + u(x)`` on the finest working grid
        (physical mm); compose it as ``compose(linear, field)``.
    """
    import torch
    from monai.losses import GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss

    settings = settings or TorchDeformableSettings()
    if metric not in TORCH_METRICS:
        raise ConfigError(f"the torch backend has no metric '{metric}' (use one of "
                          f"{', '.join(TORCH_METRICS)}).")
    if settings.regulariser not in REGULARISERS:
        raise ConfigError(f"unknown regulariser '{settings.regulariser}': use one of "
                          f"{', '.join(REGULARISERS)}.")
    report = progress or Progress()
    losses = {
        "mi": GlobalMutualInformationLoss(kernel_type="gaussian", num_bins=32),
        "lncc": LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=5),
    }
    regulariser = bending_energy if settings.regulariser == "bending" else diffusion_energy
    generator = torch.Generator().manual_seed(settings.seed)
    previous = None
    total = sum(settings.iterations)
    done = 0
    # On the CPU, one intra-op thread: the tensors here (a velocity grid of at most ~10^5
    # voxels, 10^4 samples) are too small for torch's thread pool to pay for itself.
    # Measured on 2 cores: the 256^3 pair took 8.3 s wall / 16.2 s CPU on two threads
    # and 8.7 s / 10.6 s on one; an STS PET/CT pair 12.6 / 16.8 against 12.8 / 13.0.
    threads = cpu_threads(1) if torch.device(device).type == "cpu" else contextlib.nullcontext()
    with threads:
        for spacing, iterations in zip(settings.spacings_mm, settings.iterations, strict=True):
            check_cancel(cancel, "the deformable registration")
            level = _build_level(fixed, moving, linear, fixed_mask, moving_mask, spacing,
                                 settings, metric, device)
            deformation = _Deformation(level.grid, level.velocity_shape, level.fixed.shape[2:],
                                       spacing, settings.velocity_factor,
                                       settings.scaling_steps, device)
            if previous is not None:
                previous.upsample_to(deformation)
            optimiser = torch.optim.Adam([deformation.velocity], lr=settings.learning_rate_mm)
            for iteration in range(iterations):
                check_cancel(cancel, "the deformable registration")
                optimiser.zero_grad()
                loss = _similarity_loss(metric, level, deformation, generator,
                                        settings.samples, losses)
                if loss is None:
                    break
                penalty = regulariser(deformation.velocity / deformation.velocity_spacing)
                (loss + settings.weight * penalty).backward()
                optimiser.step()
                report((done + iteration + 1) / total, f"deformable, {spacing:g} mm level")
            done += iterations
            previous = deformation
        with torch.no_grad():
            # (D, H, W, [z, y, x])
            dense = previous.dense_mm()[0].permute(1, 2, 3, 0).cpu().numpy()
    grid = level.grid
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    physical = dense[..., ::-1] @ direction.T  # grid-axis (x, y, z) mm -> physical mm
    report(1.0, "deformable registration done")
    return displacement_field_transform(physical, grid)
