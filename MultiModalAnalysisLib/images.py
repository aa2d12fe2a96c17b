"""The engine's image model: ``SimpleITK.Image`` plus validation and geometry helpers.

Every step takes and returns ``SimpleITK.Image`` (it carries origin, spacing and direction);
numpy arrays appear only inside a step. Validation raises the project's errors with messages
that name the input and say what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import (
    ConstantImageError,
    EmptyImageError,
    GeometryError,
    ImageDimensionError,
    LabelError,
    NonFiniteImageError,
    UnitsError,
)

NanPolicy = Literal["error", "zero", "minimum"]
NAN_POLICIES = ("error", "zero", "minimum")

_INTEGER_TYPES = {
    sitk.sitkUInt8,
    sitk.sitkInt8,
    sitk.sitkUInt16,
    sitk.sitkInt16,
    sitk.sitkUInt32,
    sitk.sitkInt32,
    sitk.sitkUInt64,
    sitk.sitkInt64,
}


def is_integer_image(image: sitk.Image) -> bool:
    """True when the pixel type is an integer type."""
    return image.GetPixelID() in _INTEGER_TYPES


def require_3d(image: sitk.Image, name: str = "image") -> None:
    """Refuse an image that is not 3-D (any pixel type; no other check).

    Raises:
        ImageDimensionError: a 2-D slice or a 4-D series, saying which it looks like.
    """
    dimension = image.GetDimension()
    if dimension != 3:
        hint = (
            "a single slice; load the whole series or volume"
            if dimension == 2
            else "a time series or multi-volume file; extract one 3-D volume first"
        )
        raise ImageDimensionError(
            f"{name} is {dimension}-D (size {image.GetSize()}); a 3-D volume is needed: this "
            f"looks like {hint}."
        )


def validate_image(
    image: sitk.Image,
    name: str = "image",
    *,
    require_contrast: bool = False,
    nan_policy: NanPolicy = "error",
) -> sitk.Image:
    """Check that ``image`` is a usable 3-D scalar volume; return it (or a NaN-fixed copy).

    Args:
        image: the image to check (never modified).
        name: how to call the image in messages (a file name or a modality).
        require_contrast: also refuse a constant image (steps that need contrast).
        nan_policy: ``"error"`` refuses NaN/Inf; ``"zero"`` or ``"minimum"`` return a copy with
            non-finite voxels replaced by 0 or by the smallest finite value.

    Raises:
        ImageDimensionError, EmptyImageError, NonFiniteImageError, ConstantImageError.
    """
    if not isinstance(image, sitk.Image):
        raise TypeError(f"{name}: expected a SimpleITK.Image, got {type(image).__name__}")
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, not {nan_policy!r}")
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise ImageDimensionError(
            f"{name} has {components} components per voxel (a vector or colour image); a "
            "scalar 3-D volume is needed. Split the channels or convert it to grey levels."
        )
    require_3d(image, name)
    if any(size == 0 for size in image.GetSize()):
        raise EmptyImageError(f"{name} has no voxels (size {image.GetSize()}).")
    size = image.GetSize()
    if sum(1 for s in size if s > 1) < 2:
        raise ImageDimensionError(
            f"{name} has size {size}: it is a line or a single voxel, not a volume."
        )

    if not is_integer_image(image):
        array = sitk.GetArrayViewFromImage(image)
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(finite.size - finite.sum())
            if nan_policy == "error":
                raise NonFiniteImageError(
                    f"{name} holds {bad} NaN or infinite voxel(s) of {finite.size}. Fix the "
                    "file (e.g. replace them in Slicer or with SimpleITK), or in Python load it "
                    "with nan_policy='zero' or 'minimum' to replace them."
                )
            if not finite.any():
                raise NonFiniteImageError(f"{name} holds no finite value at all.")
            fill = 0.0 if nan_policy == "zero" else float(array[finite].min())
            fixed = np.where(finite, array, fill).astype(array.dtype)
            image = copy_geometry(sitk.GetImageFromArray(fixed), image)

    if require_contrast:
        require_non_constant(image, name)
    return image


def value_range(image: sitk.Image) -> tuple[float, float]:
    """The smallest and largest voxel values of ``image``."""
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    return float(stats.GetMinimum()), float(stats.GetMaximum())


def require_non_constant(image: sitk.Image, name: str = "image") -> None:
    """Raise :class:`ConstantImageError` if every voxel has the same value."""
    low, high = value_range(image)
    if low == high:
        raise ConstantImageError(
            f"{name} is constant (every voxel is {low:g}): there is no contrast "
            "to work with. Check that the right file or series was loaded."
        )


def copy_geometry(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Give ``image`` (same size) the origin, spacing and direction of ``reference``."""
    image.CopyInformation(reference)
    return image


def image_from_array(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A new image from a ``[z, y, x]`` array, on ``reference``'s grid."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.CopyInformation(reference)
    return image


def as_float32(image: sitk.Image) -> sitk.Image:
    """The image as 32-bit float (a new image unless it already is float32)."""
    if image.GetPixelID() == sitk.sitkFloat32:
        return image
    return sitk.Cast(image, sitk.sitkFloat32)


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    """True when two images share size, origin, spacing and direction (to ``tolerance``)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance * 10)
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)
    )


def grid_difference(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> str:
    """How ``a``'s grid differs from ``b``'s, for messages (e.g. "origin (0, 0, 0) vs
    (5, 0, 0)"); empty when they are the same grid (see :func:`same_grid`)."""
    def text(values) -> str:
        return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"

    parts = []
    if a.GetSize() != b.GetSize():
        parts.append(f"size {a.GetSize()} vs {b.GetSize()}")
    for what, get, atol in (("spacing", "GetSpacing", tolerance),
                            ("origin", "GetOrigin", tolerance * 10),
                            ("direction", "GetDirection", tolerance)):
        first, second = getattr(a, get)(), getattr(b, get)()
        if not np.allclose(first, second, atol=atol):
            parts.append(f"{what} {text(first)} vs {text(second)}")
    return ", ".join(parts)


def physical_corners(image: sitk.Image) -> np.ndarray:
    """The 8 physical corner points (outer voxel edges) of the image, shape (8, 3)."""
    size = np.array(image.GetSize(), dtype=float)
    corners = []
    for i in (-0.5, size[0] - 0.5):
        for j in (-0.5, size[1] - 0.5):
            for k in (-0.5, size[2] - 0.5):
                corners.append(image.TransformContinuousIndexToPhysicalPoint((i, j, k)))
    return np.asarray(corners)


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounding box (min corner, max corner) of the image, in mm."""
    corners = physical_corners(image)
    return corners.min(axis=0), corners.max(axis=0)


def overlap_fraction(image: sitk.Image, reference: sitk.Image) -> float:
    """Fraction of ``reference``'s bounding box volume that ``image``'s bounding box covers."""
    lo_a, hi_a = physical_bounds(image)
    lo_b, hi_b = physical_bounds(reference)
    inter = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None)
    volume = np.prod(hi_b - lo_b)
    return float(np.prod(inter) / volume) if volume > 0 else 0.0


def require_overlap(
    image: sitk.Image, reference: sitk.Image, name: str = "image", reference_name: str = "reference"
) -> None:
    """Raise :class:`GeometryError` when two images share no physical space."""
    if overlap_fraction(image, reference) <= 0.0:
        lo_a, hi_a = physical_bounds(image)
        lo_b, hi_b = physical_bounds(reference)
        raise GeometryError(
            f"{name} and {reference_name} do not overlap in physical space ({name} spans "
            f"{np.round(lo_a, 1).tolist()}..{np.round(hi_a, 1).tolist()} mm, {reference_name} "
            f"spans {np.round(lo_b, 1).tolist()}..{np.round(hi_b, 1).tolist()} mm). Check that "
            "they are from the same patient and frame of reference, or register them first."
        )


def validate_mask(
    mask: sitk.Image, name: str = "mask", reference: sitk.Image | None = None
) -> sitk.Image:
    """Check a binary mask and return it as UInt8 with values {0, 1}.

    Args:
        mask: a label image whose non-zero voxels form the region (values 0 and one
            other value, or 0/1); a multi-label image is refused.
        name: how to call it in messages.
        reference: when given, the mask must be on the reference's grid.

    Raises:
        LabelError: more than one non-zero label, or non-integer values.
        EmptyImageError: no voxel is set.
        GeometryError: not on the reference grid.
    """
    validate_image(mask, name)
    array = sitk.GetArrayViewFromImage(mask)
    values = np.unique(array)
    if not is_integer_image(mask) and not np.all(np.mod(values, 1) == 0):
        raise LabelError(
            f"{name} holds non-integer values (e.g. {values[np.mod(values, 1) != 0][:3]}); a "
            "mask must be a label image. Was an intensity image given as the mask?"
        )
    nonzero = values[values != 0]
    if nonzero.size == 0:
        raise EmptyImageError(f"{name} is empty: no voxel is set. Draw or select a region.")
    if nonzero.size > 1:
        raise LabelError(
            f"{name} holds {nonzero.size} different labels ({nonzero[:6].tolist()}...); a binary "
            "mask (0 = outside, one value inside) is needed. Select one label first (in "
            "Python: images.select_label; mma features takes --label N) or give a binary "
            "mask."
        )
    if reference is not None and not same_grid(mask, reference):
        raise GeometryError(
            f"{name} is not on the image's grid ({grid_difference(mask, reference)}). "
            "Resample it to the image first (preprocess.resample_to_reference, nearest "
            "neighbour)."
        )
    binary = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8)
    return binary


def mask_centroid(mask: sitk.Image) -> tuple[float, float, float]:
    """Physical centre of mass (mm) of a mask's non-zero voxels."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8))
    if not stats.HasLabel(1):
        raise EmptyImageError("the mask is empty: no voxel is set.")
    return tuple(stats.GetCentroid(1))


def describe(image: sitk.Image) -> str:
    """One line on an image's grid and pixel type, for logs and reports."""
    spacing = "x".join(f"{s:.3g}" for s in image.GetSpacing())
    size = "x".join(str(s) for s in image.GetSize())
    return f"{size} voxels at {spacing} mm, {image.GetPixelIDTypeAsString()}"


# FDG uptake rarely exceeds 50 SUV even in the hottest lesion; the 99th percentile of a
# PET in SUV is a few units (2-21 over the 20 STS crops, whose maxima are 5-53). A PET
# whose 99th percentile is above this is in Bq/ml, or is another image (an MR: hundreds).
SUV_P99_MAX = 100.0


def implausible_intensities(
    modality: str, image: sitk.Image, *, pet_in_suv: bool = False
) -> str | None:
    """A reason to doubt that ``image`` is of ``modality`` (CT in HU, PET in SUV or Bq/ml,
    or in SUV only with ``pet_in_suv``), from its value range; ``None`` when it looks right
    or the modality has no fixed scale."""
    from MultiModalAnalysisLib.modalities import modality_family

    family = modality_family(modality)
    if family not in ("CT", "PET"):
        return None
    low, high = value_range(image)
    if family == "CT" and (low > -100 or high < 100):
        return f"values {low:g}..{high:g} do not look like CT in HU (air/fat below -100)"
    if family == "PET" and low < -1.0:
        return f"values {low:g}..{high:g} go below 0, unlike PET uptake"
    if family == "PET" and pet_in_suv and high > SUV_P99_MAX:
        array = sitk.GetArrayViewFromImage(image)
        step = max(1, int(round((array.size / 1_000_000) ** (1 / 3))))  # a sample is enough
        p99 = float(np.percentile(array[::step, ::step, ::step], 99))
        if p99 > SUV_P99_MAX:
            return (f"values {low:g}..{high:g} (99th percentile {p99:.4g}) are far above "
                    "SUV, unlike PET uptake in SUV (Bq/ml, or another image)")
    return None


def require_plausible_units(images: Mapping[str, sitk.Image], what: str, *,
                            pet_in_suv: bool = False) -> None:
    """Refuse images whose values do not fit the modality they are given as (CT not in
    HU, PET below 0, or above SUV with ``pet_in_suv``): typically two inputs swapped, whose
    features or network inputs would be on another scale and give a confident, wrong answer.

    Raises:
        UnitsError: naming each doubtful image and why.
    """
    doubts = [f"the image given as {name}: {doubt}" for name, image in images.items()
              if (doubt := implausible_intensities(str(name), image, pet_in_suv=pet_in_suv))
              is not None]
    if doubts:
        names = list(map(str, images))
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        raise UnitsError(
            f"{what} takes {listed}, but " + "; ".join(doubts)
            + ". Check that each image is given under its own modality (two inputs swapped?) "
            "and in the units expected (CT in HU" + (", PET in SUV" if pet_in_suv else "")
            + ").")


def select_label(mask: sitk.Image, value: int, name: str = "mask") -> sitk.Image:
    """The voxels of one label of a label image, as a binary UInt8 mask (0/1).

    Raises:
        LabelError: ``value`` is not a label value (a whole number of 1 or more).
        EmptyImageError: no voxel holds ``value`` (the labels present are named).
    """
    if isinstance(value, bool) or not float(value).is_integer() or value < 1:
        raise LabelError(f"label {value!r} of {name}: give a label value of 1 or more (0 is "
                         "outside every label).")
    array = sitk.GetArrayViewFromImage(mask)
    selected = array == value
    if not selected.any():
        present = np.unique(array[array != 0])
        raise EmptyImageError(
            f"{name} has no voxel of label {value} (labels present: "
            f"{present[:10].tolist() if present.size else 'none'}).")
    result = sitk.GetImageFromArray(selected.astype(np.uint8))
    result.CopyInformation(mask)
    return result
