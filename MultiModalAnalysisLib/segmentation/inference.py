"""Running a trained network on co-registered images: sliding windows with overlap and
Gaussian blending, optional test-time flips (whose spread is the uncertainty map) or
MC-dropout, probabilities brought back to the reference image's grid, then clean-up."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.device import autocast, autocast_dtype, run_with_device_fallback
from MultiModalAnalysisLib.errors import ConfigError, ImageDimensionError
from MultiModalAnalysisLib.images import image_from_array, require_3d
from MultiModalAnalysisLib.preprocess import resample_to_reference
from MultiModalAnalysisLib.progress import ProgressCallback, as_progress, check_cancel
from MultiModalAnalysisLib.segmentation.inputs import (
    coverage,
    covered_region,
    region_array,
    require_images,
)
from MultiModalAnalysisLib.segmentation.model_file import (
    SegmentationModel,
    load_segmentation_model,
)
from MultiModalAnalysisLib.segmentation.model_inputs import prepare_channels
from MultiModalAnalysisLib.segmentation.postprocess import clean_labels
from MultiModalAnalysisLib.segmentation.result import SegmentationResult, probability_image

log = logging.getLogger(__name__)

# Test-time augmentation: flips of the in-plane axes of a [batch, channel, z, y, x] tensor.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (4,), (3,), (3, 4))


def predict_probabilities(
    network,
    channels: np.ndarray,
    patch_size_zyx: Sequence[int],
    device,
    *,
    overlap: float = 0.5,
    flips: Sequence[Sequence[int]] = ((),),
    mc_samples: int = 0,
    sw_batch_size: int = 2,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities of a ``[channel, z, y, x]`` volume, averaged over passes.

    Args:
        network: a torch module giving ``[batch, class, z, y, x]`` logits.
        channels: the prepared input.
        patch_size_zyx: the sliding window (voxels, z y x).
        device: a ``torch.device``.
        overlap: fraction of overlap between windows (Gaussian-weighted blending).
        flips: one pass per entry, flipping those tensor axes (test-time augmentation).
        mc_samples: when > 0, that many passes with dropout active (MC-dropout) instead.
        sw_batch_size: windows per forward pass.
        progress: ``progress(fraction, message)`` callback.
        cancel: stops between passes when set.

    Returns:
        ``(probabilities [class, z, y, x], variance [z, y, x] of the foreground probability
        over the passes, or None for a single pass)``.
    """
    import torch
    from monai.inferers import sliding_window_inference

    report = as_progress(progress)
    network = network.to(device).eval()
    if mc_samples > 0:
        for module in network.modules():
            if isinstance(module, torch.nn.modules.dropout._DropoutNd):
                module.train()
        passes: list[Sequence[int]] = [()] * mc_samples
    else:
        passes = [tuple(f) for f in flips] or [()]
    volume = torch.from_numpy(np.ascontiguousarray(channels, dtype=np.float32))[None].to(device)
    reduced = autocast_dtype(device)

    def one_pass(dims, dtype):
        with torch.no_grad(), autocast(device, dtype):
            source = torch.flip(volume, dims) if dims else volume
            # Volumes smaller than a window are padded by repeating their edge, as the
            # training patches were; zeros would read as mid-window intensities.
            logits = sliding_window_inference(
                source, list(patch_size_zyx), sw_batch_size, network, overlap=overlap,
                mode="gaussian", padding_mode="replicate",
            )
            probabilities = torch.softmax(logits.float(), dim=1)
            if dims:
                probabilities = torch.flip(probabilities, dims)
        return probabilities[0].cpu().numpy()

    total = None
    foreground_sq = None
    try:
        for i, dims in enumerate(passes):
            check_cancel(cancel, "segmentation with the model")
            probabilities = one_pass(dims, reduced)
            if reduced is not None and not np.isfinite(probabilities).all():
                log.warning("the network's output overflowed in %s on %s; that pass was "
                            "run again in float32.", str(reduced).replace("torch.", ""),
                            device)
                probabilities = one_pass(dims, None)
            foreground = 1.0 - probabilities[0]
            total = probabilities if total is None else total + probabilities
            squared = foreground**2
            foreground_sq = squared if foreground_sq is None else foreground_sq + squared
            report((i + 1) / len(passes), f"pass {i + 1}/{len(passes)}")
    finally:
        network.eval()
    mean = total / len(passes)
    if len(passes) == 1:
        return mean, None
    variance = np.maximum(foreground_sq / len(passes) - (1.0 - mean[0]) ** 2, 0.0)
    return mean, variance.astype(np.float32)


def resolve_model(model: Any):
    """A loaded model from what the user gave: a model, a model path, or a bundle folder."""
    from MultiModalAnalysisLib.segmentation.bundle import (
        MonaiBundle,
        is_monai_bundle,
        load_monai_bundle,
    )

    if isinstance(model, SegmentationModel | MonaiBundle):
        return model
    if model is None:
        raise ConfigError(
            "method 'model' needs a model: a model file or folder (mma train-segmentation), "
            "a MONAI bundle folder, or a loaded model."
        )
    path = Path(model)
    if is_monai_bundle(path):
        return load_monai_bundle(path)
    return load_segmentation_model(path, device="cpu")


def probabilities_on_reference(
    probabilities: np.ndarray, grid: sitk.Image, reference: sitk.Image
) -> np.ndarray:
    """``[class, z, y, x]`` probabilities from the model grid onto the reference grid
    (linear interpolation, renormalised)."""
    resampled = []
    for component in probabilities:
        image = resample_to_reference(image_from_array(component.astype(np.float32), grid),
                                      reference, default_value=0.0, name="probabilities")
        resampled.append(sitk.GetArrayFromImage(image))
    stacked = np.stack(resampled)
    stacked[0] += stacked.sum(axis=0) == 0  # outside the model grid: background
    return stacked / stacked.sum(axis=0, keepdims=True)


def background_outside(probabilities: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    """``[class, z, y, x]`` probabilities with every voxel outside ``region`` (a boolean
    ``[z, y, x]``; ``None``: no region) certain background (class 0)."""
    if region is None:
        return probabilities
    restricted = probabilities.copy()
    restricted[:, ~region] = 0.0
    restricted[0, ~region] = 1.0
    return restricted


def segment_with_model(
    images: Mapping[str, sitk.Image],
    model: Any,
    *,
    device: str = "auto",
    tta: bool = True,
    overlap: float = 0.5,
    mc_samples: int = 0,
    presets_applied: bool = False,
    cleanup: dict[str, Any] | None = None,
    mask: sitk.Image | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> SegmentationResult:
    """Segment ``images`` with a trained model; labels on the first image's grid.

    Args:
        images: modality name -> co-registered image; the model's modalities must be there.
        model: a :class:`SegmentationModel`, a model path, or a MONAI bundle (folder).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``; CUDA out-of-memory falls back to the CPU.
        tta: average over in-plane flips; their spread is the uncertainty map (a MONAI
            bundle runs once, without flips or an uncertainty map).
        overlap: sliding-window overlap.
        mc_samples: use MC-dropout with this many passes (instead of flips) for uncertainty
            (not for bundles).
        presets_applied: the images already went through the modality presets (not for
            bundles, which bring their own preprocessing).
        cleanup: ``keep_largest`` / ``fill_holes`` / ``min_volume_mm3``, each overriding
            the same setting of the clean-up stored with the model (``keep_largest=False``
            turns a stored one off); a bundle has none stored.
        mask: labels only inside this region (any grid; nearest neighbour onto the
            first image's): the network sees the whole images, and everything outside the
            region is background, before the clean-up (so "the largest component" is the
            largest inside the region).
        progress: ``progress(fraction, message)`` callback.
        cancel: stops the work when set.
    """
    require_images(images)
    for name, image in images.items():  # (a 3-D network; its grid is the first image's)
        require_3d(image, str(name))
        if 1 in image.GetSize():
            raise ImageDimensionError(
                f"{name} is a single slice (size {' x '.join(map(str, image.GetSize()))}): "
                "a model segments 3-D volumes. Load the whole series or volume.")
    report = as_progress(progress)
    model = resolve_model(model)
    first = next(iter(images))
    reference = images[first]
    region = region_array(mask, reference) if mask is not None else None
    if not isinstance(model, SegmentationModel):
        from MultiModalAnalysisLib.segmentation.bundle import segment_with_bundle

        if mc_samples or presets_applied:
            raise ConfigError(
                f"a MONAI bundle runs its own network and preprocessing once: "
                f"{'mc_samples' if mc_samples else 'presets_applied'} applies to this "
                "project's models only.")
        result = segment_with_bundle(
            images, model, device=device, overlap=overlap,
            region=_covered(images, reference, region, first), progress=report, cancel=cancel)
        if cleanup:
            result.labels = _cleaned(result.labels, cleanup)
            result.info["cleanup"] = cleanup
        return result
    ordered = model.check_inputs(images)
    if not presets_applied:
        _warn_if_presets_changed(model)
    # The network sees the padding where an input has no data; no label is kept there.
    region = _covered(ordered, reference, region, first)
    channels, grid = prepare_channels(
        ordered, model.modalities, model.spacing, model.normalisations, reference=reference,
        presets_applied=presets_applied, progress=report.sub(0.0, 0.4), cancel=cancel,
    )

    def run(torch_device):
        return predict_probabilities(
            model.network, channels, model.patch_size[::-1], torch_device, overlap=overlap,
            flips=TTA_FLIPS if tta else ((),), mc_samples=mc_samples,
            progress=report.sub(0.4, 0.9), cancel=cancel,
        )

    probabilities, variance = run_with_device_fallback(run, device, "segmentation with a model")
    model.network.to("cpu")
    on_reference = background_outside(
        probabilities_on_reference(probabilities, grid, reference), region)
    labels = image_from_array(on_reference.argmax(axis=0).astype(np.uint8), reference)
    # The user's clean-up settings override the model's own, one by one.
    settings = {**model.postprocess, **(cleanup or {})}
    labels = _cleaned(labels, settings)
    if not sitk.GetArrayViewFromImage(labels).any():
        log.warning("model '%s' labels no voxel%s: the label map is empty.", model.name,
                    " inside the mask" if mask is not None else "")
    uncertainty = None
    if variance is not None:
        uncertainty = resample_to_reference(image_from_array(variance, grid), reference,
                                            default_value=0.0, name="uncertainty")
        if region is not None:  # certain background there, as the probabilities say
            kept = sitk.GetArrayFromImage(uncertainty)
            kept[~region] = 0.0
            uncertainty = image_from_array(kept, reference)
    labels, names, colors, values = _as_training_values(labels, model)
    report(1.0, "segmented")
    return SegmentationResult(
        labels=labels,
        probabilities=probability_image(on_reference, reference),
        uncertainty=uncertainty,
        label_names=names,
        label_colors=colors,
        method="model",
        info={
            # (probability component k is the label valued label_values[k])
            **({"label_values": values} if values else {}),
            "model": model.name,
            "model_path": str(model.path) if model.path else None,
            "training_cases": list((model.metadata.get("training") or {}).get("cases") or []),
            "modalities": model.modalities,
            "spacing": model.spacing,
            "tta": bool(tta) and mc_samples == 0,
            "mc_samples": mc_samples,
            "cleanup": settings,
            "masked": region is not None,
        },
    )


def _as_training_values(labels: sitk.Image, model: SegmentationModel):
    """The labels with the values the training label maps gave them (a model trained on
    maps holding 2 and 5 learns labels 1 and 2, and writes 2 and 5 again), with their names
    and colours under those values, and ``{model label: value}`` (``None`` when they are
    the same)."""
    stored = model.metadata.get("label_values_in_training") or {}
    values = {int(label): int(value) for value, label in stored.items()}
    if all(label == value for label, value in values.items()):
        return labels, model.label_names, model.label_colors, None
    lookup = np.arange(max(256, max(values.values()) + 1), dtype=np.int64)
    for label, value in values.items():
        lookup[label] = value
    array = lookup[sitk.GetArrayViewFromImage(labels)]
    array = array.astype(np.uint8 if array.max() <= 255 else np.uint16)
    return (image_from_array(array, labels),
            {values.get(k, k): n for k, n in model.label_names.items()},
            {values.get(k, k): c for k, c in model.label_colors.items()},
            {0: 0, **values})


def _warn_if_presets_changed(model: SegmentationModel) -> None:
    """Warn for each input that this version preprocesses otherwise than the model's
    training data was (the model stores each modality's preset as it was described then):
    the network would see inputs on another scale than it learnt, e.g. MR z-scores over
    another body region."""
    from MultiModalAnalysisLib.preprocess import preset_for

    stored = model.metadata.get("presets") or {}
    for name in model.modalities:
        then, now = stored.get(name), preset_for(name).describe()
        if then is not None and then != now:
            log.warning("%s: this model was trained on images preprocessed as '%s'; this "
                        "version preprocesses them as '%s'. Its labels may be off: retrain "
                        "it with this version.", name, then, now)


def _covered(images: Mapping[str, sitk.Image], reference: sitk.Image,
             region: np.ndarray | None, first: str) -> np.ndarray | None:
    """``region`` (``None``: all of ``reference``'s grid) less where an input has no data
    (see ``inputs.coverage``); ``None`` when that leaves the whole grid."""
    covered, uncovered_by = coverage(images, reference)
    if covered is None:
        return region
    where = "the mask" if region is not None else f"{first}'s grid"
    whole = region if region is not None else np.ones(covered.shape, bool)
    return covered_region(whole, covered, uncovered_by, where)


def _cleaned(labels: sitk.Image, settings: Mapping[str, Any]) -> sitk.Image:
    return clean_labels(
        labels,
        keep_largest=bool(settings.get("keep_largest", False)),
        fill=bool(settings.get("fill_holes", False)),
        min_volume_mm3=float(settings.get("min_volume_mm3", 0.0)),
    )
