"""``extract_features``: every requested IBSI feature of one or more images in one ROI.

For each image: the IBSI processing chain (:mod:`roi`), discretisation
(:mod:`discretisation`), then each family's module; values come back as floats keyed
``<image>_<IBSI tag>`` (e.g. ``PET_stat_max``, ``MR_T1_cm_joint_max_3D_comb``). Features
that a region makes undefined (a single voxel has no texture, a flat region no third axis)
are NaN, with one warning per image naming them.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed

import SimpleITK as sitk
import torch

from MultiModalAnalysisLib.device import cpu_threads, run_with_device_fallback, worker_threads
from MultiModalAnalysisLib.errors import ConfigError, MMAError, MMAWarning
from MultiModalAnalysisLib.features.discretisation import discretise
from MultiModalAnalysisLib.features.glcm import glcm_feature_values
from MultiModalAnalysisLib.features.gldzm import gldzm_feature_values
from MultiModalAnalysisLib.features.glrlm import glrlm_feature_values
from MultiModalAnalysisLib.features.glszm import glszm_feature_values
from MultiModalAnalysisLib.features.intensity_histogram import intensity_histogram_feature_values
from MultiModalAnalysisLib.features.intensity_volume_histogram import ivh_feature_values
from MultiModalAnalysisLib.features.local_intensity import local_intensity_feature_values
from MultiModalAnalysisLib.features.morphology import morphology_feature_values
from MultiModalAnalysisLib.features.ngldm import ngldm_feature_values
from MultiModalAnalysisLib.features.ngtdm import ngtdm_feature_values
from MultiModalAnalysisLib.features.roi import RegionOfInterest, prepare_roi
from MultiModalAnalysisLib.features.settings import (
    FAMILIES,
    TEXTURE_FAMILIES,
    FeatureSettings,
    load_settings,
)
from MultiModalAnalysisLib.features.statistics import statistics_feature_values
from MultiModalAnalysisLib.features.zones import border_distance, find_zones
from MultiModalAnalysisLib.progress import Progress, ProgressCallback, as_progress, check_cancel

log = logging.getLogger(__name__)


class UndefinedFeatureWarning(MMAWarning):
    """Some features are undefined for a region (e.g. texture of a single voxel): NaN."""


def extract_features(
    images: Mapping[str, sitk.Image],
    mask: sitk.Image,
    settings: FeatureSettings | dict | str | None = None,
    device: str | torch.device = "auto",
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    workers: int | None = None,
) -> dict[str, float]:
    """IBSI features of each image inside ``mask``.

    Args:
        images: image name (``"CT"``, ``"PET"``, ``"fused"``...) -> image.
        mask: the region of interest (binary; resampled onto an image on another grid,
            with a warning, unless ``settings.mask_grid_mismatch == "error"``).
        settings: :class:`FeatureSettings`, a dict of them, a JSON/YAML file, or None for
            the defaults.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        progress: ``progress(fraction, message)``.
        cancel: stops the work between families when set.
        workers: threads computing feature families side by side (default: one per CPU
            core, at most 4; 1 for strictly sequential work).

    Returns:
        ``{"<image>_<IBSI tag>": value}`` for every image and feature.

    Raises:
        EmptyImageError: empty mask, mask outside an image, nothing left after
            re-segmentation. GeometryError, ConfigError: see the settings.
    """
    settings = load_settings(settings)
    if not images:
        raise MMAError("extract_features needs at least one image.")
    _warn_about_unmatched_images(settings, images)
    return _features_of(images, mask, settings, device, as_progress(progress), cancel,
                        workers)


def _features_of(images: Mapping[str, sitk.Image], mask: sitk.Image,
                 settings: FeatureSettings, device: str | torch.device,
                 report: Progress, cancel: threading.Event | None,
                 workers: int | None) -> dict[str, float]:
    """:func:`extract_features` once its settings are read and checked."""
    values: dict[str, float] = {}
    for number, (name, image) in enumerate(images.items()):
        check_cancel(cancel, "feature extraction")
        part = report.sub(number / len(images), (number + 1) / len(images))

        def work(target: torch.device, name=name, image=image, part=part) -> dict[str, float]:
            return image_features(image, mask, settings.for_image(name), target, name, part,
                                  cancel, workers)

        # The feature arithmetic runs on tensors of a few hundred thousand elements or
        # fewer, where intra-op threading gains little and, on a busy machine, its
        # spinning worker threads cost several times the work itself (measured: 0.4 s on
        # one thread against 1.5-4 s on two for the sample patient's three modalities).
        with cpu_threads(1):
            features = run_with_device_fallback(work, device, f"feature extraction for {name}")
        values.update({f"{name}_{tag}": value for tag, value in features.items()})
    report(1.0, "features done")
    return values


def extract_on_own_grids(
    images: Mapping[str, sitk.Image],
    region: sitk.Image,
    transforms: Mapping[str, sitk.Transform] | None = None,
    settings: FeatureSettings | dict | str | None = None,
    device: str | torch.device = "auto",
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    region_transform: sitk.Transform | None = None,
) -> dict[str, float]:
    """IBSI features of each image on its own grid, in a region drawn on another grid.

    As :func:`extract_features` with one mask for images on several grids (a CT and its
    PET, each as read): the region is taken onto each image's grid by IBSI mask
    interpolation. The images and the region may lie in other frames than the reference
    one (the fixed image's of a registration): ``transforms[name]`` maps a reference point
    to the image's (fixed -> moving, as ``register`` gives it), ``region_transform`` to the
    region's (a mask drawn on a registered image); each missing one is the identity.

    Raises:
        ConfigError: an image's transform without an exact inverse (a deformable
            registration).
    """
    from MultiModalAnalysisLib.features.roi import mask_onto_image

    settings = load_settings(settings)
    report = as_progress(progress)
    _warn_about_unmatched_images(settings, images)
    transforms = dict(transforms or {})
    values: dict[str, float] = {}
    for number, (name, image) in enumerate(images.items()):
        mask = region
        transform = transforms.get(name)
        if transform is not None and not transform.IsLinear():
            raise ConfigError(
                f"{name} was registered by a non-linear (deformable) transform, which has "
                "no exact inverse to map the region onto its own grid: register it rigidly "
                "or affinely for features measured on its own grid.")
        if transform is not None or region_transform is not None:
            # an image point -> the reference frame -> the region's frame
            steps = [t for t in (region_transform,
                                 transform.GetInverse() if transform is not None else None)
                     if t is not None]
            image_to_region = steps[0] if len(steps) == 1 else sitk.CompositeTransform(steps)
            mask = mask_onto_image(region, image, settings.for_image(name), image_to_region)
        values.update(_features_of(  # (settings checked once, above, for every image)
            {name: image}, mask, settings, device,
            report.sub(number / len(images), (number + 1) / len(images)), cancel, None))
    return values


def _warn_about_unmatched_images(settings: FeatureSettings, images: Mapping[str, object]
                                 ) -> None:
    """A ``per_image`` name that is no modality and no given image is likely a typo (a
    modality absent here is not: one settings file serves CT-only and CT+PET runs)."""
    from MultiModalAnalysisLib.features.settings import _image_key
    from MultiModalAnalysisLib.modalities import modality_family

    given = {_image_key(name) for name in images}
    for key in settings.per_image:
        if key not in given and modality_family(key) == "OTHER":
            log.warning("the feature settings' per_image %s names none of the images "
                        "measured (%s): its settings are not used.", key,
                        ", ".join(map(str, images)))


def image_features(
    image: sitk.Image,
    mask: sitk.Image,
    settings: FeatureSettings,
    device: torch.device,
    name: str = "image",
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    workers: int | None = None,
) -> dict[str, float]:
    """IBSI features of one image, keyed by bare IBSI tag (``stat_max``...).

    ``workers`` threads compute the families side by side (default: one per CPU core).
    """
    report = as_progress(progress)
    roi = prepare_roi(image, mask, settings, device, name)
    families = sorted((f for f in FAMILY_STEPS if settings.wants(f)), key=FAMILY_ORDER.index)
    context = _Context(roi, settings)
    if any(f in families for f in ("ih", *TEXTURE_FAMILIES)):
        _ = context.grey  # shared by the threads below: computed once, up front
    values: dict[str, torch.Tensor | float] = {}
    workers = max(1, min(workers or worker_threads(), len(families)))
    if workers == 1:
        for done, family in enumerate(families):
            values.update(_run_family(family, context, cancel))
            report((done + 1) / len(families), f"{name}: {family} done")
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="features") as pool:
            futures = {pool.submit(_run_family, f, context, cancel): f for f in families}
            try:
                for done, future in enumerate(as_completed(futures)):
                    values.update(future.result())
                    report((done + 1) / len(families), f"{name}: {futures[future]} done")
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    if settings.features is not None:
        _check_feature_patterns(settings, values)
        values = {k: v for k, v in values.items() if settings.wants_feature(k)}
    floats = _to_floats({k: values[k] for k in sorted(values, key=_tag_order)})
    _warn_undefined(floats, name, int(roi.intensity_mask.sum()))
    return floats


def feature_tags(settings: FeatureSettings | dict | str | None = None) -> list[str]:
    """The IBSI tags :func:`extract_features` gives with ``settings``, in column order.

    Found by computing them (on the CPU) on a small built-in phantom, a ball of 16^3
    voxels of random intensities inside the settings' re-segmentation range, so the list
    is what the extraction itself makes: each family and aggregation level the settings
    ask for, ``features`` patterns applied. ``mma features --list-features`` prints it.
    """
    import numpy as np

    settings = load_settings(settings)
    low, high = settings.resegmentation_range or (None, None)
    low = 0.0 if low is None else float(low)
    high = low + 100.0 if high is None else float(high)
    rng = np.random.default_rng(0)
    size = 16
    values = rng.uniform(low, high, (size, size, size))
    if settings.intensity_rounding or high - low >= 20:
        values = np.clip(np.round(values), np.ceil(low), np.floor(high))
    image = sitk.GetImageFromArray(values.astype(np.float64))
    image.SetSpacing(tuple(float(s) for s in settings.new_spacing or (1.0, 1.0, 1.0)))
    z, y, x = np.indices((size, size, size)) - (size - 1) / 2
    mask = sitk.GetImageFromArray((x**2 + y**2 + z**2 <= 6.5**2).astype(np.uint8))
    mask.CopyInformation(image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedFeatureWarning)
        with cpu_threads(1):
            computed = image_features(image, mask, settings, torch.device("cpu"), workers=1)
    return list(computed)


def _check_feature_patterns(settings: FeatureSettings, computed: Mapping[str, object]) -> None:
    """A ``features`` entry that selects nothing is a typo, not a wish for an empty table."""
    unmatched = settings.unmatched_features(computed)
    if unmatched:
        families = sorted({t.split("_", 1)[0] for t in computed})
        raise ConfigError(
            f"features: {', '.join(repr(p) for p in unmatched)} match(es) no feature computed "
            f"with these settings (families {', '.join(families)}; tags as in IBSI, e.g. "
            "'stat_mean', 'cm_joint_max_3D_avg', or patterns such as 'szm_*'; "
            "`mma features --list-features` lists them all)."
        )


def _run_family(family: str, context: _Context, cancel: threading.Event | None):
    check_cancel(cancel, "feature extraction")
    return FAMILY_STEPS[family](context)


def _tag_order(tag: str) -> int:
    """Output order: IBSI's family order (a stable sort keeps each family's own order)."""
    return FAMILIES.index(tag.split("_", 1)[0])


class _Context:
    """What the family steps share for one image, computed on first use."""

    def __init__(self, roi: RegionOfInterest, settings: FeatureSettings) -> None:
        self.roi_with_margin = roi  # the local-intensity sphere reaches beyond the mask
        self.roi = roi.cropped_to_mask()
        self.settings = settings
        self._grey: tuple[torch.Tensor, int] | None = None
        self._zones: dict[str, object] = {}
        self._zones_lock = threading.Lock()  # GLSZM and GLDZM share the zones

    @property
    def grey(self) -> tuple[torch.Tensor, int]:
        """Texture grey levels (0 outside the intensity mask) and their number."""
        if self._grey is None:
            self._grey = discretise(
                self.roi.image, self.roi.intensity_mask, self.settings.texture, self.roi.name
            )
        return self._grey

    @property
    def aggregation(self) -> tuple[str, ...]:
        return self.settings.texture_aggregation

    def zones(self, level: str):
        """Grey-level zones of the 2-D (per slice) or 3-D ROI, with border distances."""
        if level not in self.aggregation and not (level == "2D" and "2.5D" in self.aggregation):
            return None
        with self._zones_lock:
            return self._find_zones(level)

    def _find_zones(self, level: str):
        if level not in self._zones:
            in_plane = level == "2D"
            distance = None
            if self.settings.wants("dzm"):  # only distance zones need the distance map
                distance = border_distance(self.roi.morphology_mask, in_plane)
            self._zones[level] = find_zones(self.grey[0], distance, in_plane)
        return self._zones[level]


def _morphology(c: _Context):
    return morphology_feature_values(c.roi, c.settings.non_standard_features, c.settings)


def _local_intensity(c: _Context):
    return local_intensity_feature_values(c.roi_with_margin)


def _statistics(c: _Context):
    return statistics_feature_values(c.roi.values)


def _intensity_histogram(c: _Context):
    scheme = c.settings.intensity_histogram
    if scheme == c.settings.texture:
        grey, n_levels = c.grey
    else:
        grey, n_levels = discretise(c.roi.image, c.roi.intensity_mask, scheme, c.roi.name)
    return intensity_histogram_feature_values(grey[c.roi.intensity_mask], n_levels)


def _intensity_volume_histogram(c: _Context):
    return ivh_feature_values(
        c.roi.values, c.settings.intensity_volume_histogram, c.settings.non_standard_features
    )


def _glcm(c: _Context):
    return glcm_feature_values(*c.grey, c.aggregation, c.settings.glcm_distance)


def _glrlm(c: _Context):
    return glrlm_feature_values(*c.grey, c.aggregation)


def _glszm(c: _Context):
    return glszm_feature_values(*c.grey, c.zones("2D"), c.zones("3D"))


def _gldzm(c: _Context):
    return gldzm_feature_values(*c.grey, c.zones("2D"), c.zones("3D"))


def _ngtdm(c: _Context):
    return ngtdm_feature_values(*c.grey, c.aggregation, c.settings.ngtdm_distance)


def _ngldm(c: _Context):
    return ngldm_feature_values(
        *c.grey, c.aggregation, c.settings.ngldm_distance, c.settings.ngldm_coarseness
    )


# Heaviest first, so that the last family to start is a short one.
FAMILY_ORDER = ("rlm", "morph", "szm", "dzm", "cm", "ngl", "ngt", "loc", "ih", "ivh", "stat")
FAMILY_STEPS: dict[str, Callable[[_Context], Mapping[str, torch.Tensor | float]]] = {
    "morph": _morphology,
    "loc": _local_intensity,
    "stat": _statistics,
    "ih": _intensity_histogram,
    "ivh": _intensity_volume_histogram,
    "cm": _glcm,
    "rlm": _glrlm,
    "szm": _glszm,
    "dzm": _gldzm,
    "ngt": _ngtdm,
    "ngl": _ngldm,
}


def _to_floats(values: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Plain floats, with one device-to-host copy for all tensor values."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    result = {k: float(v) for k, v in values.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        device = next(iter(tensors.values())).device
        stacked = torch.stack(
            [t.to(device=device, dtype=torch.float64).reshape(()) for t in tensors.values()]
        )
        result.update(zip(tensors, stacked.cpu().tolist(), strict=True))
    return {k: result[k] for k in values}


def _warn_undefined(values: Mapping[str, float], name: str, n_voxels: int) -> None:
    undefined = [k for k, v in values.items() if v != v]  # NaN
    if not undefined:
        return
    why = " (the ROI has a single voxel)" if n_voxels == 1 else ""
    message = (
        f"{name}: {len(undefined)} feature(s) are undefined for this ROI{why} and set to NaN: "
        f"{', '.join(undefined[:8])}{', ...' if len(undefined) > 8 else ''}"
    )
    log.warning(message)
    warnings.warn(message, UndefinedFeatureWarning, stacklevel=3)
