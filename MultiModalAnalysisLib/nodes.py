"""The pipeline over MRML nodes: preprocess, resample, register, fuse, segment, extract
features and classify, taking volume/segmentation/table nodes and returning new nodes.

Every step is a :class:`NodeTask` split in three so that Slicer never freezes:

1. reading: when the task is built (on Slicer's main thread) its input nodes are copied to
   ``SimpleITK`` images;
2. ``compute(progress, cancel)``: the engine work, pure SimpleITK/torch, which may run in a
   worker thread (``jobs.StepRunner``);
3. ``publish(result)``: new nodes are added to the scene (main thread again).

``task.run(progress, cancel)`` does all three in a row, for scripts and Slicer's Python
console; ``*_volume(s)`` / ``segment_volumes`` / ... are shortcuts for that. Inputs are never
modified. Images that must share a grid (fusion, segmentation, features) are resampled onto
the first (reference) volume's grid here, so volumes of different size, spacing or
orientation can be combined directly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib import mrml
from MultiModalAnalysisLib.errors import EmptyImageError, MMAError
from MultiModalAnalysisLib.modalities import canonical_modality
from MultiModalAnalysisLib.progress import Progress, ProgressCallback, as_progress, check_cancel

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class NodeTask(Generic[T]):
    """One step over nodes: ``compute`` may run off the main thread, ``publish`` may not."""

    name: str
    compute_images: Callable[[Progress, threading.Event | None], Any]
    publish_result: Callable[[Any], T]

    def compute(self, progress: ProgressCallback | None, cancel: threading.Event | None) -> Any:
        """The engine work (no MRML access): safe in a worker thread."""
        return self.compute_images(as_progress(progress), cancel)

    def publish(self, result: Any) -> T:
        """Turn the engine's result into nodes (main thread)."""
        return self.publish_result(result)

    def run(
        self, progress: ProgressCallback | None = None, cancel: threading.Event | None = None
    ) -> T:
        """Compute and publish in the calling thread."""
        return self.publish(self.compute(progress, cancel))


def _name(node: Any) -> str:
    return node.GetName() or "volume"


def _read_volume(node: Any, role: str) -> sitk.Image:
    if node is None:
        raise MMAError(f"no {role} volume was selected: choose one.")
    return mrml.image_from_volume_node(node)


def _on_grid(image: sitk.Image, reference: sitk.Image, name: str, is_label: bool = False):
    """``image`` on ``reference``'s grid (unchanged when it already is)."""
    from MultiModalAnalysisLib.images import same_grid
    from MultiModalAnalysisLib.preprocess import resample_to_reference

    if same_grid(image, reference):
        return image
    return resample_to_reference(image, reference, is_label=is_label, name=name)


def _label_image(mask_node: Any, reference_node: Any) -> sitk.Image:
    """A label image from a segmentation node or a labelmap volume node."""
    if mask_node is None:
        raise MMAError("no mask or segmentation was selected: choose one.")
    if mask_node.IsA("vtkMRMLSegmentationNode"):
        return mrml.labels_from_segmentation_node(mask_node, reference_node)
    return mrml.image_from_volume_node(mask_node)


def _mask_image(mask_node: Any, reference_node: Any, role: str) -> sitk.Image:
    """A binary mask from a segmentation node (the union of its segments, said in the log
    when there are several) or a labelmap node (as it is: several labels are refused
    downstream, naming them)."""
    labels = _label_image(mask_node, reference_node)
    if not mask_node.IsA("vtkMRMLSegmentationNode"):
        return labels
    names = list(mrml.segment_names(mask_node).values())
    if len(names) > 1:
        log.info("the %s is the union of the %d segments of %s (%s).", role, len(names),
                 _name(mask_node), ", ".join(names))
    return sitk.Cast(labels != 0, sitk.sitkUInt8)


def _region_masks(mask_node: Any, reference_node: Any) -> dict[str, sitk.Image]:
    """The non-empty regions to measure, by name, each a whole binary mask: every segment
    of a segmentation node (overlapping segments each keep their whole region; two segments
    of one name are told apart by their ID), or every label value of a labelmap node."""
    if mask_node is None:
        raise MMAError("no mask or segmentation was selected: choose one.")
    regions: dict[str, sitk.Image] = {}
    if mask_node.IsA("vtkMRMLSegmentationNode"):
        segmentation = mask_node.GetSegmentation()
        masks = mrml.segment_masks(mask_node, reference_node)
        names = [segmentation.GetSegment(i).GetName() for i in masks]
        for (segment_id, mask), name in zip(masks.items(), names, strict=True):
            if names.count(name) > 1:
                name = f"{name} ({segment_id})"
            if sitk.GetArrayViewFromImage(mask).any():
                regions[name] = mask
        return regions
    from MultiModalAnalysisLib.images import select_label

    labels = mrml.image_from_volume_node(mask_node)
    for value in np.unique(sitk.GetArrayViewFromImage(labels)):
        if value != 0:
            regions[f"label {int(value)}"] = select_label(labels, value, _name(mask_node))
    return regions


# ------------------------------------------------------------------------------- preprocessing


def preprocess_task(
    volume_node: Any, modality: str, *, scene: Any | None = None, name: str = ""
) -> NodeTask:
    """Apply the modality preset (CT clip, MR N4 + z-score, ...) to a volume node.

    Returns a task publishing a new scalar volume node named ``<input> preprocessed``, under
    the input's parent transform (if any) and shown where the input is: a registration of
    the copy then replaces that parent as one of the input does.
    """
    from MultiModalAnalysisLib.preprocess import apply_modality_preset

    image = _read_volume(volume_node, canonical_modality(modality))
    out_name = name or f"{_name(volume_node)} preprocessed"
    parent = volume_node.GetParentTransformNode()

    def compute(progress: Progress, cancel: threading.Event | None) -> sitk.Image:
        return apply_modality_preset(image, modality, progress=progress, cancel=cancel)

    def publish(result: sitk.Image) -> Any:
        node = mrml.volume_node_from_image(result, scene or volume_node.GetScene(), out_name)
        if parent is not None:
            mrml.keep_in_place_under(node, parent)
        return node

    return NodeTask(f"preprocess {_name(volume_node)}", compute, publish)


def resample_task(
    volume_node: Any,
    reference_node: Any,
    *,
    transform_node: Any | None = None,
    is_label: bool | None = None,
    scene: Any | None = None,
    name: str = "",
) -> NodeTask:
    """Resample a volume onto a reference volume's grid (optionally through a transform node).

    Args:
        volume_node: the volume to resample (scalar or labelmap).
        reference_node: the volume whose grid the result takes.
        transform_node: maps the reference's space to the volume's (as a registration's
            output node does); none: the volumes already share a frame.
        is_label: nearest-neighbour resampling (default: True for labelmap nodes).
    """
    from MultiModalAnalysisLib.preprocess import resample_to_reference

    image = _read_volume(volume_node, "moving")
    reference = _read_volume(reference_node, "reference")
    transform = mrml.transform_from_transform_node(transform_node, reference) if (
        transform_node is not None
    ) else None
    label = volume_node.IsA("vtkMRMLLabelMapVolumeNode") if is_label is None else is_label
    out_name = name or f"{_name(volume_node)} on {_name(reference_node)}"

    def compute(progress: Progress, cancel: threading.Event | None) -> sitk.Image:
        check_cancel(cancel, "resampling")
        result = resample_to_reference(
            image, reference, transform=transform, is_label=label, name=_name(volume_node)
        )
        progress(1.0, f"resampled {_name(volume_node)}")
        return result

    def publish(result: sitk.Image) -> Any:
        return mrml.volume_node_from_image(
            result, scene or volume_node.GetScene(), out_name, labelmap=label
        )

    return NodeTask(f"resample {_name(volume_node)}", compute, publish)


def preprocess_volume(volume_node: Any, modality: str, *, progress=None, cancel=None, **kw) -> Any:
    """:func:`preprocess_task` run at once; returns the new volume node."""
    return preprocess_task(volume_node, modality, **kw).run(progress, cancel)


def resample_volume(volume_node: Any, reference_node: Any, *, progress=None, cancel=None, **kw):
    """:func:`resample_task` run at once; returns the new volume node."""
    return resample_task(volume_node, reference_node, **kw).run(progress, cancel)


# -------------------------------------------------------------------------------- registration


@dataclass
class RegistrationNodes:
    """What a registration publishes."""

    transform_node: Any  # set it as the moving volume's parent to align it with the fixed
    warped_node: Any  # the moving volume resampled on the fixed grid
    metrics: dict[str, Any] = field(default_factory=dict)
    # UInt8 on the fixed grid: 1 where the warped volume has data (inside the moving
    # volume's field of view), 0 where it is padding
    field_of_view: sitk.Image | None = None


@dataclass
class _RegistrationImages:
    """A registration's outputs as engine objects, ready to become nodes."""

    transform: sitk.Transform  # linear, or a displacement field on the fixed grid
    warped: sitk.Image
    field_of_view: sitk.Image
    metrics: dict[str, Any]


def register_task(
    fixed_node: Any,
    moving_node: Any,
    *,
    transform: str = "rigid",
    metric: str = "auto",
    device: str = "auto",
    fixed_modality: str | None = None,
    moving_modality: str | None = None,
    fixed_mask_node: Any | None = None,
    fixed_landmarks_node: Any | None = None,
    moving_landmarks_node: Any | None = None,
    landmark_transform: str = "rigid",
    scene: Any | None = None,
    name: str = "",
    **options: Any,
) -> NodeTask[RegistrationNodes]:
    """Register a moving volume to a fixed one (``registration.register``).

    Publishes a transform node (linear, or grid for deformable) that aligns the moving volume
    when set as its parent, and the warped moving volume on the fixed grid. A moving volume
    that already has a parent transform is registered where that shows it, and the node
    published replaces the parent (it includes the parent's inverse).

    Landmarks: two markups point lists, the same anatomical points clicked on the fixed and
    on the moving volume (paired by label, else in order: :func:`mrml.landmark_pairs`). With
    ``transform`` rigid/affine/deformable they start the registration (3 pairs or more) and
    its TRE at them is reported; with ``transform="landmarks"`` the landmarks alone give the
    transform (``landmark_transform``: rigid, similarity or affine; no image metric).
    """
    fixed = _read_volume(fixed_node, "fixed")
    moving = _read_volume(moving_node, "moving")
    fixed_mask = (
        _on_grid(_mask_image(fixed_mask_node, fixed_node, "fixed mask"), fixed, "fixed mask",
                 is_label=True)
        if fixed_mask_node is not None
        else None
    )
    landmarks = _landmarks(fixed_landmarks_node, moving_landmarks_node)
    label = f"{_name(moving_node)} to {_name(fixed_node)}"
    if transform == "landmarks":
        if landmarks is None:
            raise MMAError(
                f"registering {label} by landmarks needs point lists on both volumes: click "
                "the same anatomical points on each (Markups module) and choose both lists."
            )
        # Fitted now (a least-squares fit of a few points: instant), so bad points are
        # refused before the task is queued; compute() only hands the result over.
        registration = _landmark_registration(fixed, moving, landmarks, landmark_transform)
    else:
        def registration(progress: Progress, cancel: threading.Event | None) -> Any:
            from MultiModalAnalysisLib.registration import register

            return register(
                fixed, moving, transform=transform, metric=metric, fixed_mask=fixed_mask,
                device=device, fixed_modality=fixed_modality, moving_modality=moving_modality,
                landmarks=landmarks, progress=progress, cancel=cancel, **options,
            )

    parent = moving_node.GetParentTransformNode()
    # Read now, with the moving image: the parent may change while the registration runs.
    # (A linear one: reading the image refused any other.)
    undo_parent = (mrml.transform_from_transform_node(parent, reference=fixed)
                   if parent is not None else None)

    def compute(progress: Progress, cancel: threading.Event | None) -> _RegistrationImages:
        result = registration(progress, cancel)
        # What publish() stores, computed here, in the worker: publish only adds nodes.
        from MultiModalAnalysisLib.images import image_from_array
        from MultiModalAnalysisLib.segmentation.inputs import field_of_view

        check_cancel(cancel, "the registration")
        aligning = result.transform
        if undo_parent is not None:
            # The moving volume was read where its parent transform shows it, so the result
            # maps the fixed world to that place. The node replaces the parent: it also
            # undoes it (fixed point -> shown moving point -> the volume's own frame).
            aligning = sitk.CompositeTransform([undo_parent, aligning])
        aligning = mrml.as_node_transform(aligning, fixed)
        check_cancel(cancel, "the registration")
        warped = result.warped
        covered = field_of_view(moving, fixed, result.transform).astype(np.uint8)
        return _RegistrationImages(aligning, warped, image_from_array(covered, fixed),
                                   dict(result.metrics))

    def publish(result: _RegistrationImages) -> RegistrationNodes:
        target = scene or fixed_node.GetScene()
        transform_node = mrml.transform_node_from_transform(
            result.transform, target, name or f"{label} ({transform})")
        warped_name = f"{_name(moving_node)} registered"
        warped = mrml.volume_node_from_image(result.warped, target, warped_name)
        return RegistrationNodes(transform_node, warped, result.metrics, result.field_of_view)

    return NodeTask(f"register {label}", compute, publish)


def _landmarks(fixed_node: Any | None, moving_node: Any | None):
    """Paired LPS points from two markups nodes; ``None`` when neither is given."""
    if fixed_node is None and moving_node is None:
        return None
    if fixed_node is None or moving_node is None:
        given, missing = ("fixed", "moving") if moving_node is None else ("moving", "fixed")
        raise MMAError(
            f"landmarks were given on the {given} volume only: choose the point list of the "
            f"{missing} volume too (the same anatomical points, clicked on each)."
        )
    return mrml.landmark_pairs(fixed_node, moving_node)


def _landmark_registration(fixed, moving, landmarks, kind):
    """compute() of a registration from landmarks alone; the transform is fitted here.

    Raises:
        MMAError: too few points, or points that leave the transform undetermined.
    """
    import time

    from MultiModalAnalysisLib.metrics import target_registration_error
    from MultiModalAnalysisLib.registration import RegistrationResult, register_landmarks

    started = time.perf_counter()
    transform = register_landmarks(*landmarks, transform=kind)
    # At the points the transform was fitted to: the fit's residual, not an independent
    # target registration error.
    residual = target_registration_error(transform, *landmarks)
    metrics = {
        "transform_type": f"landmarks ({kind})",
        "landmark_pairs": int(len(residual)),
        "landmark_residual_mm_mean": round(float(residual.mean()), 3),
        "landmark_residual_mm_max": round(float(residual.max()), 3),
        "runtime_s": round(time.perf_counter() - started, 3),
    }

    def compute(progress: Progress, cancel: threading.Event | None) -> Any:
        check_cancel(cancel, "the landmark registration")
        progress(1.0, "landmark registration done")
        return RegistrationResult(transform, dict(metrics), fixed, moving)

    return compute


def register_volumes(fixed_node: Any, moving_node: Any, *, progress=None, cancel=None, **kw):
    """:func:`register_task` run at once; returns :class:`RegistrationNodes`."""
    return register_task(fixed_node, moving_node, **kw).run(progress, cancel)


# ------------------------------------------------------------------------------------ fusion


def fuse_task(
    volume_nodes: Sequence[Any],
    *,
    method: str = "average",
    scene: Any | None = None,
    name: str = "",
    **options: Any,
) -> NodeTask:
    """Fuse co-registered volumes into one (``fusion.fuse``) on the first volume's grid."""
    if len(volume_nodes) < 2:
        raise MMAError("fusion needs at least two volumes: add another input volume.")
    images = [_read_volume(node, "input") for node in volume_nodes]
    names = [_name(node) for node in volume_nodes]

    def compute(progress: Progress, cancel: threading.Event | None) -> sitk.Image:
        from MultiModalAnalysisLib.fusion import fuse

        on_grid = [images[0]] + [
            _on_grid(image, images[0], n) for image, n in zip(images[1:], names[1:], strict=True)
        ]
        check_cancel(cancel, "fusion")
        progress(0.3, "volumes on one grid")
        return fuse(on_grid, method=method, **options)

    def publish(result: sitk.Image) -> Any:
        target = scene or volume_nodes[0].GetScene()
        return mrml.volume_node_from_image(result, target, name or f"fused ({method})")

    return NodeTask(f"fuse ({method})", compute, publish)


def fuse_volumes(volume_nodes: Sequence[Any], *, progress=None, cancel=None, **kw) -> Any:
    """:func:`fuse_task` run at once; returns the fused volume node."""
    return fuse_task(volume_nodes, **kw).run(progress, cancel)


# ------------------------------------------------------------------------------ segmentation


@dataclass
class SegmentationNodes:
    """What a segmentation publishes."""

    segmentation_node: Any
    probabilities_node: Any | None = None  # vector volume, one component per class
    uncertainty_node: Any | None = None
    label_names: dict[int, str] = field(default_factory=dict)


def _images_on_reference(volume_nodes: Mapping[str, Any]) -> tuple[dict[str, sitk.Image], Any]:
    if not volume_nodes:
        raise MMAError("no input volume was given: choose at least one.")
    images = {canonical_modality(m): _read_volume(n, m) for m, n in volume_nodes.items()}
    return images, next(iter(volume_nodes.values()))


def segment_task(
    volume_nodes: Mapping[str, Any],
    *,
    method: str = "gmm",
    classes: int = 3,
    model: str | Path | Any | None = None,
    mask_node: Any | None = None,
    device: str = "auto",
    scene: Any | None = None,
    name: str = "",
    show_3d: bool = True,
    field_of_view: sitk.Image | None = None,
    **options: Any,
) -> NodeTask[SegmentationNodes]:
    """Segment co-registered volumes (``segmentation.segment``) into a segmentation node.

    Args:
        volume_nodes: modality name -> volume node; the first one is the reference grid, the
            others are resampled onto it.
        method: ``gmm``, ``kmeans``, ``threshold`` or ``model``.
        model: a model file (or loaded model) for ``method="model"``.
        mask_node: restricts the segmentation (segmentation or labelmap node).
        show_3d: also build the 3-D surface of the segments.
        field_of_view: where every volume has data, on the first volume's grid (registered
            volumes are padded outside their own field of view, which must not be
            segmented as tissue): left unlabelled outside, with a warning.
    """
    images, reference_node = _images_on_reference(volume_nodes)
    reference_name = next(iter(images))
    mask = (_mask_image(mask_node, reference_node, "region to segment")
            if mask_node is not None else None)

    def compute(progress: Progress, cancel: threading.Event | None) -> Any:
        from MultiModalAnalysisLib.segmentation import segment

        reference = images[reference_name]
        # The volumes go in on their own grids: segment() brings them onto the reference's
        # and leaves out where one has no data (a resampled copy would be padded there).
        region = _on_grid(mask, reference, "mask", is_label=True) if mask is not None else None
        return segment(
            images, method=method, classes=classes, model=model, mask=region, device=device,
            progress=progress, cancel=cancel, field_of_view=field_of_view, **options,
        )

    def publish(result: Any) -> SegmentationNodes:
        target = scene or reference_node.GetScene()
        label_names = dict(result.label_names or {})
        seg = mrml.segmentation_node_from_labels(
            result.labels, target, names=label_names, colors=result.label_colors,
            reference_node=reference_node, name=name or f"segmentation ({method})",
            show_3d=show_3d,
        )
        extra = {}
        for key in ("probabilities", "uncertainty"):
            image = getattr(result, key, None)
            extra[key] = (
                mrml.volume_node_from_image(image, target, f"{seg.GetName()} {key}")
                if image is not None
                else None
            )
        return SegmentationNodes(seg, extra["probabilities"], extra["uncertainty"], label_names)

    return NodeTask(f"segment ({method})", compute, publish)


def segment_volumes(volume_nodes: Mapping[str, Any], *, progress=None, cancel=None, **kw):
    """:func:`segment_task` run at once; returns :class:`SegmentationNodes`."""
    return segment_task(volume_nodes, **kw).run(progress, cancel)


# ---------------------------------------------------------------------------------- features


def extract_features_task(
    volume_nodes: Mapping[str, Any],
    mask_node: Any,
    *,
    segments: Sequence[str] | None = None,
    settings: Any | None = None,
    device: str = "auto",
    case_id: str = "",
    scene: Any | None = None,
    name: str = "",
    own_grids: bool = False,
    transforms: Mapping[str, sitk.Transform] | None = None,
) -> NodeTask:
    """Radiomics features (``features.extract_features``) of each region into a table node.

    Args:
        volume_nodes: image name (modality) -> volume node; resampled onto the first one's
            grid, where the mask is taken too (with ``own_grids``: each measured on its own
            grid, the mask taken onto it, through the inverse of ``transforms[name]``, the
            registration fixed -> that volume, where one is given; as a classifier trained
            from images measured its training features).
        mask_node: a segmentation node (one row per segment) or a labelmap node (one row per
            label value).
        segments: only these segment names (default: every segment).
        settings: ``FeatureSettings``, a dict or a settings file.
        case_id: written in a ``case_id`` column (default: the reference volume's name).

    Publishes a table node with one row per region: ``case_id``, ``segment``, then one column
    per feature (``<image>_<IBSI tag>``).
    """
    images, reference_node = _images_on_reference(volume_nodes)
    masks = _region_masks(mask_node, reference_node)  # here: the export needs the scene
    regions = {name: mask for name, mask in masks.items()
               if segments is None or name in set(segments)}
    if not regions:
        raise EmptyImageError(
            f"{_name(mask_node)} has no non-empty region"
            + (f" named {', '.join(segments)}" if segments else "")
            + ": draw or select the region to measure."
        )
    case = case_id or _name(reference_node)

    def compute(progress: Progress, cancel: threading.Event | None) -> Any:
        import pandas as pd

        from MultiModalAnalysisLib.features import extract_features, extract_on_own_grids

        reference = next(iter(images.values()))
        # (each image on the reference grid, unless each is measured on its own)
        on_grid = {} if own_grids else {m: _on_grid(image, reference, m)
                                        for m, image in images.items()}
        rows = []
        for i, (region, mask) in enumerate(regions.items()):
            check_cancel(cancel, "feature extraction")
            region_mask = _on_grid(mask, reference, "mask", is_label=True)
            step = progress.sub(i / len(regions), (i + 1) / len(regions))
            if own_grids:
                features = extract_on_own_grids(
                    images, region_mask, transforms, settings, device=device, progress=step,
                    cancel=cancel)
            else:
                features = extract_features(
                    on_grid, region_mask, settings=settings, device=device, progress=step,
                    cancel=cancel,
                )
            rows.append({"case_id": case, "segment": region, **features})
        return pd.DataFrame(rows)

    def publish(table: Any) -> Any:
        target = scene or reference_node.GetScene()
        return mrml.table_node_from_dataframe(table, target, name or f"{case} features")

    return NodeTask("extract features", compute, publish)


def extract_features_to_table(volume_nodes, mask_node, *, progress=None, cancel=None, **kw):
    """:func:`extract_features_task` run at once; returns the table node."""
    return extract_features_task(volume_nodes, mask_node, **kw).run(progress, cancel)


# ------------------------------------------------------------------------------ classification


def classify_task(
    features_node: Any,
    model: str | Path | Any,
    *,
    scene: Any | None = None,
    name: str = "",
) -> NodeTask:
    """Predict the outcome of each row of a features table with a trained classifier.

    Publishes a table node: ``case_id``/``segment`` (when present), ``prediction`` (0/1),
    ``probability`` (of class 1) and ``label`` (the outcome's name, from the model metadata).
    """
    table = mrml.dataframe_from_table_node(features_node)

    def compute(progress: Progress, cancel: threading.Event | None) -> Any:
        import pandas as pd

        classifier = model
        if isinstance(model, str | Path):
            from MultiModalAnalysisLib.classification import load_classifier

            classifier = load_classifier(model)
        names = [f for f in classifier.feature_names if f in table.columns]
        missing = [f for f in classifier.feature_names if f not in table.columns]
        # A trained model checks its features itself, as mma classify and the batch have it
        # do (one it never uses may be absent); a stand-in without the check needs them all.
        if missing and not hasattr(classifier, "check_features"):
            raise MMAError(
                f"the features table lacks {len(missing)} feature(s) the classifier needs (e.g. "
                f"{', '.join(missing[:5])}). Extract features with the settings the model was "
                "trained with."
            )
        check_cancel(cancel, "classification")
        from MultiModalAnalysisLib.classification.model import predictions_of

        # (the model's own threshold and class names, as mma classify decides)
        predicted = predictions_of(classifier, table[names])
        keep = [c for c in ("case_id", "segment") if c in table.columns]
        result = table[keep].copy() if keep else pd.DataFrame(index=table.index)
        result = pd.concat([result, predicted], axis=1)
        metadata = getattr(classifier, "metadata", None) or {}
        label = metadata.get("label") if isinstance(metadata.get("label"), dict) else {}
        outcome = str(label.get("column") or metadata.get("label_column")
                      or metadata.get("outcome", "outcome"))
        result["label"] = [f"{outcome} = {p}" for p in result["prediction"]]
        progress(1.0, "classified")
        return result.reset_index(drop=True)

    def publish(result: Any) -> Any:
        target = scene or features_node.GetScene()
        return mrml.table_node_from_dataframe(result, target, name or "prediction")

    return NodeTask("classify", compute, publish)


def classify_table(features_node: Any, model: Any, *, progress=None, cancel=None, **kw) -> Any:
    """:func:`classify_task` run at once; returns the prediction table node."""
    return classify_task(features_node, model, **kw).run(progress, cancel)

