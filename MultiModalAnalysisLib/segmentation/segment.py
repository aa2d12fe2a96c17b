"""``segment``: one entry point for every segmentation method of the engine."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ConfigError
from MultiModalAnalysisLib.images import image_from_array, validate_image
from MultiModalAnalysisLib.modalities import modality_family
from MultiModalAnalysisLib.progress import ProgressCallback, as_progress, check_cancel
from MultiModalAnalysisLib.segmentation.classical import (
    GaussianMixtureSegmenter,
    KMeansSegmenter,
)
from MultiModalAnalysisLib.segmentation.inputs import (
    find_channel,
    require_images,
    stack_images,
    stack_region,
    within_field_of_view,
)
from MultiModalAnalysisLib.segmentation.postprocess import clean_labels
from MultiModalAnalysisLib.segmentation.result import SegmentationResult
from MultiModalAnalysisLib.segmentation.threshold import (
    otsu_threshold,
    range_threshold,
    suv_fraction_threshold,
)
from MultiModalAnalysisLib.values import finite, flag, whole

log = logging.getLogger(__name__)

METHODS = ("gmm", "kmeans", "threshold", "model")
THRESHOLDS = ("otsu", "range", "suv_fraction")
# The settings each threshold kind takes (any other of these is refused, not ignored).
_THRESHOLD_SETTINGS = {"otsu": (), "range": ("low", "high"), "suv_fraction": ("fraction",)}
_THRESHOLD_USES = {"low": "range", "high": "range", "fraction": "suv_fraction"}
_CLASSICAL_OPTIONS = {
    "order_by", "regularisation", "beta", "iterations", "smoothing_mm", "max_samples",
    "random_state", "n_init",
}
_MODEL_OPTIONS = {"tta", "overlap", "mc_samples", "presets_applied"}
_CLEANUP_OPTIONS = {"keep_largest", "fill_holes", "min_volume_mm3"}


def segment(
    images: Mapping[str, sitk.Image],
    method: str = "gmm",
    classes: int = 3,
    model: Any = None,
    mask: sitk.Image | None = None,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    field_of_view: sitk.Image | None = None,
    **options: Any,
) -> SegmentationResult:
    """Segment co-registered images; the labels are on the first image's grid.

    Args:
        images: modality name -> image, all in one physical frame (registered); the first
            image's grid is the output grid.
        method: ``"gmm"`` / ``"kmeans"`` (multichannel classification into ``classes``
            classes, class 1 = lowest mean of ``order_by``), ``"threshold"`` (one image:
            Otsu, a range, or a fraction of SUVmax) or ``"model"`` (a trained network or
            a MONAI bundle).
        classes: number of classes for gmm/kmeans.
        model: for ``"model"``: a model file or folder, a MONAI bundle folder, or a model
            loaded with :func:`load_segmentation_model` / :func:`load_monai_bundle`.
        mask: restrict the segmentation to this region (a model sees the whole images and
            labels only inside it).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (networks only).
        progress: ``progress(fraction, message)`` callback.
        cancel: stops the work when set.
        field_of_view: where images that were resampled before (registered volumes) have
            data, a binary image (on any grid; resampled onto the first image's). They
            hold padding elsewhere, which must not be classified as tissue: those voxels
            are left unlabelled (0), with a warning. Images given on their own grids need
            none: their coverage is worked out here.
        **options: method settings.
            gmm/kmeans: ``order_by``, ``regularisation`` (icm/smoothing/none), ``beta``,
            ``iterations``, ``smoothing_mm``, ``max_samples``, ``random_state``, ``n_init``.
            threshold: ``threshold`` (otsu/range/suv_fraction; default range when ``low`` or
            ``high`` is given, suv_fraction when ``fraction`` is or for a PET image, else
            otsu; a setting the chosen kind does not use is refused), ``channel`` (which
            image; default the PET image for suv_fraction, else the first), ``low``,
            ``high``, ``fraction`` (0.4).
            model: ``tta`` (test-time flips, default True), ``overlap`` (0.5; a MONAI
            bundle's own inferer overlap, when it gives one), ``mc_samples`` (MC-dropout
            passes instead of flips), ``presets_applied`` (the images already went through
            the modality presets).
            Any method: ``keep_largest``, ``fill_holes``, ``min_volume_mm3`` clean-ups (a
            model applies those stored with it by default).

    Raises:
        ConfigError: unknown method or option; MissingModalityError: a needed image is
        missing; other ``MMAError`` subclasses for unusable images or masks.
    """
    require_images(images)
    report = as_progress(progress)
    start = time.perf_counter()
    check_cancel(cancel, "segmentation")
    method = str(method).lower()
    options = _checked(options)
    if field_of_view is not None:
        first = next(iter(images))
        mask = within_field_of_view(mask, field_of_view,
                                    validate_image(images[first], str(first)))
    if method in ("gmm", "kmeans"):
        result = _classical(images, method, classes, mask, options, report, cancel)
    elif method == "threshold":
        result = _threshold(images, mask, options)
    elif method == "model":
        from MultiModalAnalysisLib.segmentation.inference import segment_with_model

        _unknown(options, _MODEL_OPTIONS, "model")
        cleanup = {k: options.pop(k) for k in list(options) if k in _CLEANUP_OPTIONS}
        result = segment_with_model(
            images, model, device=device, cleanup=cleanup or None, mask=mask,
            progress=report.sub(0, 0.98), cancel=cancel, **options,
        )
        options = {}
    else:
        raise ConfigError(
            f"unknown segmentation method '{method}': use one of {', '.join(METHODS)}."
        )
    check_cancel(cancel, "segmentation")
    cleanup = {k: options[k] for k in _CLEANUP_OPTIONS if k in options}
    if cleanup:
        result.labels = clean_labels(
            result.labels,
            keep_largest=bool(cleanup.get("keep_largest", False)),
            fill=bool(cleanup.get("fill_holes", False)),
            min_volume_mm3=float(cleanup.get("min_volume_mm3", 0.0)),
        )
        result.info["cleanup"] = cleanup
    result.info["runtime_s"] = time.perf_counter() - start
    report(1.0, f"{method} segmentation done")
    return result


def _checked(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with the common settings checked and in their proper types (``None``
    means "not given" for the clean-ups and the model's settings)."""
    checked = dict(options)
    for key in ("keep_largest", "fill_holes", "tta", "presets_applied"):
        if key in checked:
            if checked[key] is None:
                del checked[key]
            else:
                checked[key] = flag(key, checked[key])
    numbers = {"min_volume_mm3": lambda v: finite("min_volume_mm3", v, 0.0),
               "overlap": lambda v: finite("overlap", v, 0.0, 0.95),
               "mc_samples": lambda v: whole("mc_samples", v, 0, 1000),
               "low": lambda v: finite("low", v), "high": lambda v: finite("high", v),
               "fraction": lambda v: finite("fraction", v, 0.0, 1.0)}
    for key, check in numbers.items():
        if checked.get(key) is not None:
            checked[key] = check(checked[key])
        elif key in ("min_volume_mm3", "overlap", "mc_samples"):
            checked.pop(key, None)
    return checked


def _unknown(options: Mapping[str, Any], allowed: set[str], method: str) -> None:
    unknown = sorted(set(options) - allowed - _CLEANUP_OPTIONS)
    if unknown:
        raise ConfigError(
            f"method '{method}' does not take the option(s) {', '.join(unknown)} (it takes: "
            f"{', '.join(sorted(allowed | _CLEANUP_OPTIONS))})."
        )


def _classical(
    images: Mapping[str, sitk.Image],
    method: str,
    classes: int,
    mask: sitk.Image | None,
    options: dict[str, Any],
    report,
    cancel: threading.Event | None,
) -> SegmentationResult:
    _unknown(options, _CLASSICAL_OPTIONS, method)
    settings = {k: v for k, v in options.items() if k in _CLASSICAL_OPTIONS}
    estimator_type = GaussianMixtureSegmenter if method == "gmm" else KMeansSegmenter
    classes = whole("classes", classes, 1, 254)
    estimator = estimator_type(classes, **settings)
    report(0.05, f"fitting {method} with {classes} classes")
    estimator.fit(images, mask, cancel=cancel)
    return estimator.segment(images, mask, progress=report.sub(0.3, 0.98), cancel=cancel)


def _threshold(
    images: Mapping[str, sitk.Image], mask: sitk.Image | None, options: dict[str, Any]
) -> SegmentationResult:
    _unknown(options, {"threshold", "channel", "low", "high", "fraction"}, "threshold")
    names = list(images)
    pet_names = [n for n in names if modality_family(n) == "PET"]
    channel = options.get("channel")
    kind = options.get("threshold")
    if kind is None and (options.get("low") is not None or options.get("high") is not None):
        kind = "range"  # bounds given: they are the threshold
    elif kind is None and options.get("fraction") is not None:
        kind = "suv_fraction"
    elif kind is None:
        looked_at = channel or (pet_names[0] if pet_names else names[0])
        kind = "suv_fraction" if modality_family(looked_at) == "PET" else "otsu"
    kind = str(kind).lower().replace("-", "_")
    if kind not in THRESHOLDS:
        raise ConfigError(f"unknown threshold '{kind}': use one of {', '.join(THRESHOLDS)}.")
    given = {k for k, v in options.items() if v is not None}
    not_taken = sorted(given & (_THRESHOLD_USES.keys() - set(_THRESHOLD_SETTINGS[kind])))
    if not_taken:
        uses = sorted({_THRESHOLD_USES[k] for k in not_taken})
        raise ConfigError(
            f"the {kind} threshold does not use {', '.join(not_taken)} (it takes "
            f"{', '.join(_THRESHOLD_SETTINGS[kind]) or 'no setting'}): drop "
            f"{'it' if len(not_taken) == 1 else 'them'}, or choose the threshold that uses "
            f"{'it' if len(not_taken) == 1 else 'them'} ({' / '.join(uses)})."
        )
    if channel is None:
        channel = pet_names[0] if kind == "suv_fraction" and pet_names else names[0]
    channel = find_channel(names, channel)
    # The channel alone, on the first image's grid; where it has no data (its padding is
    # no measurement) is left out of the threshold's region.
    stack = stack_images({channel: images[channel]}, reference=validate_image(
        images[names[0]], names[0]))
    image = validate_image(image_from_array(stack.channels[0], stack.reference), channel)
    if stack.covered is not None:
        region = stack_region(stack, mask, grid=str(names[0]))
        mask = image_from_array(region.astype(np.uint8), stack.reference)
    if kind == "otsu":
        labels, value = otsu_threshold(image, mask, name=channel)
        name = f"{channel} > {value:.4g} (Otsu)"
    elif kind == "range":
        low, high = options.get("low"), options.get("high")
        labels, value = range_threshold(image, low, high, mask, name=channel), None
        name = f"{low if low is not None else '-inf'} <= {channel} <= "
        name += f"{high if high is not None else 'inf'}"
    else:
        fraction = float(options.get("fraction", 0.4))
        labels, value = suv_fraction_threshold(image, fraction, mask, name=channel)
        name = f"{channel} >= {100 * fraction:g}% of its maximum, connected to it"
    if not sitk.GetArrayViewFromImage(labels).any():
        log.warning("the threshold (%s) selects no voxel%s: the label map is empty.", name,
                    " inside the mask" if mask is not None else "")
    return SegmentationResult(
        labels=labels,
        label_names={1: name},
        label_colors={1: (0.95, 0.3, 0.2)},
        method="threshold",
        info={"threshold": kind, "channel": channel, "threshold_value": value},
    )
