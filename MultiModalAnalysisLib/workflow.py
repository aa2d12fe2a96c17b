"""The module's "Run all" and "Run batch", as steps for :class:`jobs.StepRunner`.

:func:`workflow_steps` chains the node tasks of :mod:`nodes` over one case loaded in Slicer:
preprocess -> register every further volume to the reference -> fuse -> segment -> extract
features -> classify. Each step is built when its turn comes, from what earlier steps
published (kept in a :class:`WorkflowState`), so the steps run in a worker thread one after the
other while the scene is only touched on the caller's thread.

:func:`batch_task` runs the same pipeline over case folders without creating nodes per case
and publishes one table (features and predictions, one row per case).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from MultiModalAnalysisLib import mrml, nodes
from MultiModalAnalysisLib.errors import ConfigError, MMAError, OperationCancelled
from MultiModalAnalysisLib.modalities import canonical_modality
from MultiModalAnalysisLib.progress import Progress, check_cancel

log = logging.getLogger(__name__)

STAGES = ("preprocess", "register", "fuse", "segment", "features", "classify")
# segmentations whose labels are a lesion, which a batch row can measure
BATCH_SEGMENTATIONS = ("model", "threshold")
REGISTRATION_TYPES = ("rigid", "affine", "deformable", "landmarks", "none")


@dataclass
class WorkflowSettings:
    """Every setting of the pipeline (the module's parameter node holds the same)."""

    preprocess: bool = True
    registration_type: str = "rigid"  # rigid | affine | deformable | landmarks | none
    registration_metric: str = "auto"
    device: str = "auto"
    fusion_method: str = ""  # "" skips fusion
    segmentation_method: str = "gmm"  # "" skips segmentation
    segmentation_classes: int = 3
    segmentation_model: str = ""
    show_3d: bool = True
    feature_settings: str = ""
    classifier: str = ""  # a saved classifier; "" skips classification
    case_id: str = ""

    def check(self) -> None:
        """Refuse settings that cannot work, before any work starts."""
        if self.registration_type not in REGISTRATION_TYPES:
            raise ConfigError(
                f"unknown registration type '{self.registration_type}': use "
                f"{', '.join(REGISTRATION_TYPES[:-1])} or {REGISTRATION_TYPES[-1]}."
            )
        if self.segmentation_method == "model" and not _given(self.segmentation_model):
            raise ConfigError("segmentation method 'model' needs a model file: choose one.")
        for label, path in (("segmentation model", self.segmentation_model),
                            ("feature settings", self.feature_settings),
                            ("classifier", self.classifier)):
            if _given(path) and not Path(path).exists():
                raise ConfigError(f"the {label} file {path} does not exist.")


def _given(path: str | Path | None) -> bool:
    return path is not None and str(path) not in ("", ".")


@dataclass
class WorkflowState:
    """What the steps of one run have published so far."""

    volumes: dict[str, Any]  # modality -> current volume node (reference first)
    reference: str  # the reference modality
    mask_node: Any | None = None  # the region for features (user's, else the segmentation)
    # modality -> the volume a registration of it starts from: the input or its preprocessed
    # copy, never a registered one (running Register again must not register the warped
    # copy, which would find about the identity and resample the volume twice)
    unregistered: dict[str, Any] = field(default_factory=dict)
    transforms: dict[str, Any] = field(default_factory=dict)
    registration_metrics: dict[str, dict] = field(default_factory=dict)
    # modality -> where its registered volume has data, on the reference grid (UInt8)
    fields_of_view: dict[str, Any] = field(default_factory=dict)
    fused: Any | None = None
    segmentation: nodes.SegmentationNodes | None = None
    features: Any | None = None
    prediction: Any | None = None


def workflow_steps(
    volumes: Sequence[tuple[Any, str]],
    settings: WorkflowSettings,
    *,
    mask_node: Any | None = None,
    segmentation_mask: Any | None = None,
    stages: Sequence[str] = STAGES,
    scene: Any | None = None,
    landmarks: Sequence[Any | None] | None = None,
    unregistered: Sequence[tuple[Any, str]] | None = None,
    fields_of_view: Mapping[str, Any] | None = None,
) -> tuple[list[tuple[str, Callable[[], Any]]], WorkflowState]:
    """The steps of one run over volumes loaded in Slicer, and the state they fill.

    Args:
        volumes: ``(volume node, modality)`` pairs; the first is the reference (fixed) volume.
        settings: the pipeline's settings.
        mask_node: a segmentation/labelmap to measure (default: the segmentation step's output).
        segmentation_mask: a segmentation/labelmap the segmentation step is restricted to
            (the module's "Restrict to"; several segments: their union).
        stages: which of :data:`STAGES` to run.
        scene: where new nodes go (default: the reference volume's scene).
        landmarks: a markups point list (or ``None``) per volume, in the order of
            ``volumes``: the reference's points pair with each further volume's (by label,
            else in order). They start each registration that has both (and its TRE at them
            is reported); registration type "landmarks" uses them alone.
        unregistered: ``(volume node, modality)`` pairs a registration starts from, when
            ``volumes`` are the registered volumes of an earlier run (``state.unregistered``
            of that run); default: ``volumes``.
        fields_of_view: where each registered volume of ``volumes`` has data, when they
            come from an earlier run (its ``state.fields_of_view``): the segmentation leaves
            out their padding as in one run.

    Returns:
        ``(steps, state)``: give ``steps`` to :class:`jobs.StepRunner`; read ``state`` after.
    """
    settings.check()
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ConfigError(f"unknown stage(s) {sorted(unknown)}: use {', '.join(STAGES)}.")
    if not volumes or volumes[0][0] is None:
        raise MMAError("no reference volume was selected: choose one in Inputs.")
    modalities = _modality_keys(volumes)
    duplicated = {m for m in modalities if modalities.count(m) > 1}
    if duplicated:
        raise ConfigError(
            f"several input volumes have modality {', '.join(sorted(duplicated))}: each "
            "volume needs its own modality (the features' column names start with it); "
            "choose another one for all but one of them."
        )
    state = WorkflowState(
        {m: node for (node, _), m in zip(volumes, modalities, strict=True)}, modalities[0],
        mask_node,
    )
    state.unregistered = dict(state.volumes)
    state.fields_of_view = {m: covered for m, covered in (fields_of_view or {}).items()
                            if m in state.volumes and covered is not None}
    for node, modality in zip(*_pairs(unregistered), strict=True):
        if modality in state.unregistered and node is not None:
            state.unregistered[modality] = node
    target = scene or volumes[0][0].GetScene()
    points = _landmarks_by_modality(modalities, landmarks)
    if "register" in stages and settings.registration_type == "landmarks":
        lacking = [m for m in modalities if points.get(m) is None]
        if lacking:
            raise ConfigError(
                "registration by landmarks needs a point list on every volume: none is "
                f"chosen for {', '.join(lacking)}. Click the same anatomical points on each "
                "volume (Markups module) and choose the lists in Inputs."
            )
    steps: list[tuple[str, Callable[[], Any]]] = []

    def then(task_factory: Callable[[], nodes.NodeTask], keep: Callable[[Any], None]):
        """A factory whose task also records what it published in ``state``."""

        def factory() -> nodes.NodeTask:
            task = task_factory()
            publish = task.publish_result

            def publish_and_keep(result: Any) -> Any:
                published = publish(result)
                keep(published)
                return published

            return nodes.NodeTask(task.name, task.compute_images, publish_and_keep)

        return factory

    if "preprocess" in stages and settings.preprocess:
        for modality in modalities:
            steps.append((f"preprocess {modality}", then(
                lambda m=modality: nodes.preprocess_task(state.unregistered[m], m,
                                                         scene=target),
                lambda node, m=modality: _keep_preprocessed(state, m, node),
            )))
    if "register" in stages and settings.registration_type != "none":
        for modality in modalities[1:]:
            steps.append((f"register {modality}", then(
                lambda m=modality: nodes.register_task(
                    state.volumes[state.reference], state.unregistered[m],
                    transform=settings.registration_type, metric=settings.registration_metric,
                    device=settings.device, fixed_modality=state.reference, moving_modality=m,
                    fixed_landmarks_node=points.get(state.reference) if points.get(m) else None,
                    moving_landmarks_node=points.get(m), scene=target,
                ),
                lambda out, m=modality: _keep_registration(state, m, out),
            )))
    if "fuse" in stages and settings.fusion_method and len(modalities) > 1:
        steps.append(("fuse", then(
            lambda: nodes.fuse_task(list(state.volumes.values()), method=settings.fusion_method,
                                    scene=target),
            lambda node: setattr(state, "fused", node),
        )))
    if "segment" in stages and settings.segmentation_method:
        steps.append(("segment", then(
            lambda: nodes.segment_task(
                dict(state.volumes), method=settings.segmentation_method,
                classes=settings.segmentation_classes,
                model=settings.segmentation_model if _given(settings.segmentation_model) else None,
                device=settings.device, show_3d=settings.show_3d, scene=target,
                field_of_view=_common_field_of_view(state), mask_node=segmentation_mask,
            ),
            lambda out: setattr(state, "segmentation", out),
        )))
    if "features" in stages:
        steps.append(("features", then(
            lambda: nodes.extract_features_task(
                dict(state.volumes), _region_node(state),
                settings=_feature_settings(settings),
                device=settings.device, case_id=settings.case_id, scene=target,
            ),
            lambda node: setattr(state, "features", node),
        )))
    if "classify" in stages and _given(settings.classifier):
        if mask_node is None and {"segment", "features"} <= set(stages):
            # the features would measure this run's segmentation: one row per tissue class
            _refuse_tissue_classes(settings, "the classifier reads",
                                   "choose the lesion's segmentation as the features' mask")
        steps.append(("classify", then(
            lambda: nodes.classify_task(state.features, settings.classifier, scene=target),
            lambda node: setattr(state, "prediction", node),
        )))
    return steps, state


def _refuse_tissue_classes(settings: WorkflowSettings, who: str, instead: str) -> None:
    """Refuse a segmentation whose labels are no lesion (gmm/kmeans tissue classes, which
    together cover the whole image, or none) where one region per case is needed."""
    if settings.segmentation_method in BATCH_SEGMENTATIONS:
        return
    chosen = settings.segmentation_method or "none"
    raise ConfigError(
        f"{who} one region per case: {instead}, or segment with a trained model or a "
        f"threshold; segmentation '{chosen}' "
        + ("finds tissue classes that together cover the whole image."
           if settings.segmentation_method else "gives no region.")
    )


def _modality_keys(volumes: Sequence[tuple[Any, str]]) -> list[str]:
    """The canonical modality of each volume; a volume of modality "other" is named by its
    node instead ("DWI b1000" -> ``DWI_B1000``; the features' columns start with it), so
    several sequences the list of modalities lacks can go in side by side."""
    keys = [canonical_modality(m) for _, m in volumes]
    for index, ((node, _), key) in enumerate(zip(volumes, keys, strict=True)):
        if key == "OTHER" and node is not None:
            name = canonical_modality(re.sub(r"[^0-9A-Za-z]+", "_", node.GetName()).strip("_"))
            name, number = name or "OTHER", 2
            candidate = name
            while candidate in keys[:index] or candidate in keys[index + 1:]:
                candidate, number = f"{name}_{number}", number + 1
            keys[index] = candidate
    return keys


def _pairs(volumes: Sequence[tuple[Any, str]] | None) -> tuple[list[Any], list[str]]:
    """Nodes and modality keys (as :func:`_modality_keys`) of ``(node, modality)`` pairs."""
    volumes = list(volumes or ())
    return [node for node, _ in volumes], _modality_keys(volumes)


def _landmarks_by_modality(modalities: Sequence[str], landmarks: Sequence[Any | None] | None,
                           ) -> dict[str, Any]:
    if landmarks is None:
        return {}
    if len(landmarks) > len(modalities):
        raise ConfigError(
            f"{len(landmarks)} landmark lists for {len(modalities)} volumes: give one (or "
            "None) per volume."
        )
    return {m: node for m, node in zip(modalities, landmarks, strict=False) if node is not None}


def _keep_preprocessed(state: WorkflowState, modality: str, node: Any) -> None:
    state.volumes[modality] = node
    state.unregistered[modality] = node
    # the volume is no longer the registered one: an earlier registration's field of view
    # does not describe it
    state.fields_of_view.pop(modality, None)


def _keep_registration(state: WorkflowState, modality: str, out: nodes.RegistrationNodes):
    state.volumes[modality] = out.warped_node
    state.transforms[modality] = out.transform_node
    state.registration_metrics[modality] = out.metrics
    if out.field_of_view is not None:
        state.fields_of_view[modality] = out.field_of_view


def _common_field_of_view(state: WorkflowState) -> Any:
    """Where every registered volume has data (UInt8 on the reference grid), or None."""
    import SimpleITK as sitk

    common = None
    for modality, covered in state.fields_of_view.items():
        if modality in state.volumes:
            common = covered if common is None else sitk.And(common, covered)
    return common


def _region_node(state: WorkflowState) -> Any:
    if state.mask_node is not None:
        return state.mask_node
    if state.segmentation is not None:
        return state.segmentation.segmentation_node
    raise MMAError(
        "features need a region: run the segmentation step, or choose a segmentation (for "
        "example the expert contour) as the features' mask."
    )


# ---------------------------------------------------------------------------------- batch


def batch_task(
    case_folders: Sequence[str | Path],
    settings: WorkflowSettings,
    *,
    modalities: Sequence[str],
    mask_name: str | None = None,
    scene: Any,
    name: str = "batch features",
) -> nodes.NodeTask:
    """Run the pipeline over case folders (STS layout) and publish one table, a row per case.

    Each case is loaded, preprocessed, registered to its first modality, segmented (or its own
    mask named ``mask_name`` is used), measured and, with a classifier, predicted. No node is
    created per case; a case that fails is reported in an ``error`` column and the batch goes
    on, so one bad scan does not lose a cohort's run.

    A row measures one region per case: the case's mask ``mask_name``, else what the
    segmentation finds, which must then be a lesion (method ``model`` or ``threshold``):
    gmm/kmeans classes cover the whole image, and their union would measure the whole crop.
    The segmentation leaves out where a registered volume has no data.
    """
    settings.check()
    if settings.registration_type == "landmarks":
        raise ConfigError(
            "a batch cannot register by landmarks (they are clicked per case in Slicer): "
            "choose rigid, affine, deformable or none for the batch."
        )
    if not mask_name:
        _refuse_tissue_classes(settings, "a batch measures",
                               "give the name of each case's mask (e.g. CT_mask)")
    folders = [Path(f) for f in case_folders]
    if not folders:
        raise MMAError("no case folder was given for the batch.")
    wanted = [canonical_modality(m) for m in modalities]
    if "OTHER" in wanted:
        raise ConfigError(
            "a batch reads each case folder's files by modality (CT_image.nii.gz, "
            "PET_image.nii.gz, ...): 'other' names no file. Choose the modality of every "
            "input volume (or one its files are named by, e.g. DWI for DWI_image.nii.gz).")

    def compute(progress: Progress, cancel: threading.Event | None) -> Any:
        import pandas as pd

        classifier = settings.classifier
        extraction = None
        if _given(classifier):
            classifier, extraction = _classifier_and_extraction(classifier, settings)
        rows = []
        for i, folder in enumerate(folders):
            check_cancel(cancel, "the batch")
            step = progress.sub(i / len(folders), (i + 1) / len(folders))
            try:
                rows.append(_run_case(folder, wanted, mask_name, settings, step, cancel,
                                      extraction))
            except OperationCancelled:
                raise
            except MMAError as error:
                rows.append({"case_id": folder.name, "error": str(error)})
        table = pd.DataFrame(rows)
        if _given(settings.classifier):
            table = _add_predictions(table, classifier)
        return table

    def publish(table: Any) -> Any:
        return mrml.table_node_from_dataframe(table, scene, name)

    return nodes.NodeTask(f"batch of {len(folders)} cases", compute, publish)


def _feature_settings(settings: WorkflowSettings) -> Any:
    """The feature settings of a single-case run: those the chosen classifier's training
    features were computed with, when it records them (a classifier trained from images),
    else the module's. (Also for the Features step alone: Classify, run next on its table,
    must read the features the classifier learnt.)"""
    chosen = settings.feature_settings if _given(settings.feature_settings) else None
    if not _given(settings.classifier):
        return chosen
    _, extraction = _classifier_and_extraction(settings.classifier, settings,
                                               "the Features step")
    if extraction is None:
        return chosen
    if settings.preprocess:
        log.warning(
            "the classifier learnt features of images as read, and with Preprocess on the "
            "module measures the preprocessed volumes: turn Preprocess off for a prediction "
            "on the features it learnt (the batch measures the images as read by itself).")
    return extraction["feature_settings"]


def _classifier_and_extraction(path: Any, settings: WorkflowSettings,
                               who: str = "the batch") -> tuple[Any, Any]:
    """The batch's classifier, loaded (or, when it cannot be, its path: the predictions
    then say why), and how its training features were computed (None when it does not
    record it: trained on a feature table)."""
    from MultiModalAnalysisLib.classification import load_classifier

    try:
        classifier = load_classifier(path)
    except MMAError:
        return path, None  # _add_predictions reports the error in prediction_error
    extraction = (getattr(classifier, "metadata", None) or {}).get("extraction")
    if not extraction or extraction.get("feature_settings") is None:
        return classifier, None
    if _given(settings.feature_settings):
        from MultiModalAnalysisLib.features import load_settings

        if load_settings(settings.feature_settings).to_dict() != extraction["feature_settings"]:
            log.warning(
                "%s measures with the classifier's feature settings, those its training "
                "features were computed with, not with %s: other settings would give "
                "features the classifier did not learn.", who, settings.feature_settings)
    return classifier, extraction


def _run_case(folder: Path, modalities, mask_name, settings, progress, cancel,
              extraction: dict | None = None) -> dict:
    """One batch row. With ``extraction`` (a classifier trained from images records it),
    the features are measured as ``mma classify`` measures them: with its settings, on the
    images as read (not preprocessed; moved onto the reference grid by the registration),
    and images whose values do not fit their modality are refused."""
    from MultiModalAnalysisLib.case import load_case
    from MultiModalAnalysisLib.features import extract_features
    from MultiModalAnalysisLib.images import require_plausible_units
    from MultiModalAnalysisLib.preprocess import (
        apply_modality_preset,
        mask_on_grid,
        resample_to_reference,
    )

    case = load_case(folder, modalities)
    reference = modalities[0]
    images = dict(case.images)
    if extraction is not None:  # as mma classify: swapped inputs would predict nonsense
        require_plausible_units(images, f"the classifier (case {case.case_id})")
    if settings.preprocess:
        for m in modalities:
            images[m] = apply_modality_preset(images[m], m, cancel=cancel)
    progress(0.2, f"{case.case_id}: preprocessed")
    import numpy as np
    import SimpleITK as sitk

    from MultiModalAnalysisLib.segmentation.inputs import field_of_view

    fixed = images[reference]
    covered = np.ones(sitk.GetArrayViewFromImage(fixed).shape, bool)
    transforms = {}  # a moving modality's own mask follows its registration
    for m in modalities[1:]:
        transform = None
        if settings.registration_type == "none":
            warped = resample_to_reference(images[m], fixed, name=m)
        else:
            from MultiModalAnalysisLib.registration import register

            result = register(
                fixed, images[m], transform=settings.registration_type,
                metric=settings.registration_metric, device=settings.device,
                fixed_modality=reference, moving_modality=m, cancel=cancel,
            )
            warped, transform = result.warped, result.transform
        covered &= field_of_view(images[m], fixed, transform)
        images[m] = warped
        if transform is not None:
            transforms[m] = transform
    progress(0.5, f"{case.case_id}: registered")
    if mask_name:
        from MultiModalAnalysisLib.fusion import mask_transform

        region = mask_on_grid(case.mask(mask_name), fixed, f"{case.case_id}'s {mask_name}",
                              transform=mask_transform(mask_name, transforms))
        outside = int((sitk.GetArrayViewFromImage(region).astype(bool) & ~covered).sum())
        if outside:
            log.warning("%s: %d voxel(s) of %s lie outside a registered volume's field of "
                        "view, where it is padding: its features there are not measured "
                        "values.", case.case_id, outside, mask_name)
    else:
        from MultiModalAnalysisLib.segmentation import segment

        inside = sitk.GetImageFromArray(covered.astype(np.uint8))
        inside.CopyInformation(fixed)
        region = segment(images, method=settings.segmentation_method,
                         classes=settings.segmentation_classes,
                         model=settings.segmentation_model or None,
                         field_of_view=inside, device=settings.device,
                         cancel=cancel).labels
    region = sitk.Cast(sitk.NotEqual(region, 0), sitk.sitkUInt8)
    measured, feature_settings = images, (
        settings.feature_settings if _given(settings.feature_settings) else None)
    if extraction is not None:
        feature_settings = extraction["feature_settings"]
        if settings.preprocess:  # the classifier learnt features of images as read
            from MultiModalAnalysisLib.images import same_grid

            # (the reference is read on the grid it sets: no resampling of it onto itself)
            measured = {m: case.images[m] if m not in transforms and same_grid(
                            case.images[m], fixed)
                        else resample_to_reference(case.images[m], fixed,
                                                   transform=transforms.get(m),
                                                   antialias=True, name=m)
                        for m in modalities}
    features = extract_features(measured, region, settings=feature_settings,
                                device=settings.device, cancel=cancel)
    progress(1.0, f"{case.case_id}: measured")
    return {"case_id": case.case_id, **features}


def _add_predictions(table: Any, classifier: Any) -> Any:
    """``table`` with the classifier's ``prediction``, ``probability`` and ``threshold``
    for each case that was measured (a failed case, with an ``error``, gets none), decided
    as ``mma classify`` decides. A classifier that cannot read the table leaves the
    measurements and says why in ``prediction_error``: an hour's batch is not lost."""
    from MultiModalAnalysisLib.classification.model import predictions_of

    table = table.copy()
    try:
        if isinstance(classifier, str | Path):
            from MultiModalAnalysisLib.classification import load_classifier

            classifier = load_classifier(classifier)
        measured = table.index if "error" not in table.columns else table.index[
            table["error"].isna() | (table["error"] == "")]
        if len(measured):
            names = [c for c in classifier.feature_names if c in table.columns]
            predicted = predictions_of(classifier, table.loc[measured, names])
            for column in predicted.columns:
                table[column] = predicted[column]
    except MMAError as error:
        log.warning("the batch's classifier could not be applied: %s", error)
        table["prediction_error"] = str(error)
    return table
