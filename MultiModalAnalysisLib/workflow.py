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
from MultiModalAnalysisLib.batch import (
    BatchOutput,
    check_batch,
    classifier_and_extraction,
    describe_batch,
    folder_cases,
    refuse_tissue_classes,
    run_batch,
    with_classifier_settings,
)
from MultiModalAnalysisLib.batch import given as _given
from MultiModalAnalysisLib.errors import ConfigError, MMAError
from MultiModalAnalysisLib.modalities import canonical_modality
from MultiModalAnalysisLib.progress import Progress

log = logging.getLogger(__name__)

STAGES = ("preprocess", "register", "fuse", "segment", "features", "classify")
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
            lambda: _features_task(state, settings, target),
            lambda node: setattr(state, "features", node),
        )))
    if "classify" in stages and _given(settings.classifier):
        if mask_node is None and {"segment", "features"} <= set(stages):
            # the features would measure this run's segmentation: one row per tissue class
            refuse_tissue_classes(settings, "the classifier reads",
                                   "choose the lesion's segmentation as the features' mask")
        steps.append(("classify", then(
            lambda: nodes.classify_task(state.features, settings.classifier, scene=target),
            lambda node: setattr(state, "prediction", node),
        )))
    return steps, state


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


# the table node's attribute naming the CSV a batch wrote its rows to
BATCH_FILE_ATTRIBUTE = "MultiModalAnalysis.BatchFile"


def batch_task(
    case_folders: Sequence[str | Path],
    settings: WorkflowSettings,
    *,
    modalities: Sequence[str],
    mask_name: str | None = None,
    scene: Any,
    name: str = "batch features",
    output: str | Path | None = None,
) -> nodes.NodeTask:
    """Run the pipeline over case folders (STS layout) and publish one table, a row per case.

    The engine's :func:`batch.run_batch` does the work: each case is loaded, preprocessed,
    registered to its first modality, segmented (or its own mask named ``mask_name`` is
    used), measured and, with a classifier, predicted. No node is created per case; a case
    that fails is reported in an ``error`` column and the batch goes on, so one bad scan
    does not lose a cohort's run. With ``output`` (a CSV path), the rows are also written
    there after every case, with a record of the settings beside it (as ``mma batch``
    writes them), so a crash or a cancel keeps the cases measured so far; the table node
    names the file in its :data:`BATCH_FILE_ATTRIBUTE` attribute.
    """
    folders = [Path(f) for f in case_folders]
    wanted = check_batch(settings, modalities, mask_name)
    if not folders:
        raise MMAError("no case folder was given for the batch.")

    def compute(progress: Progress, cancel: threading.Event | None) -> Any:
        cases = folder_cases(folders, wanted)
        written = None
        if output is not None:
            written = BatchOutput(output, describe_batch(
                settings, manifest=folders[0].parent, modalities=wanted,
                mask_column=mask_name), order=[c for c, _ in cases])
            log.info("the batch's rows are written to %s as each case is done", output)
        table = run_batch(cases, settings, modalities=wanted, mask_name=mask_name,
                          progress=progress, cancel=cancel, on_case=written)
        if written is not None:
            written.finish(table)
        return table

    def publish(table: Any) -> Any:
        node = mrml.table_node_from_dataframe(table, scene, name)
        if output is not None:  # (where the rows and their record are, for the user)
            node.SetAttribute(BATCH_FILE_ATTRIBUTE, str(Path(output).resolve()))
        return node

    return nodes.NodeTask(f"batch of {len(folders)} cases", compute, publish)


def _features_task(state: WorkflowState, settings: WorkflowSettings, target: Any
                   ) -> nodes.NodeTask:
    """The Features step: every volume on the reference grid, with the module's feature
    settings; or, with a classifier trained from images (Classify, run next on its table,
    must read the features it learnt), as ``mma classify`` measures: with its feature
    settings, on the volumes registrations start from (the inputs, with Preprocess off),
    each on its own grid, the region mapped onto a registered one through the inverse of
    its registration."""
    settings = with_classifier_settings(settings)
    chosen = settings.feature_settings if _given(settings.feature_settings) else None
    extraction = None
    if _given(settings.classifier):
        extraction = classifier_and_extraction(settings.classifier, settings,
                                               "the Features step")[1]
    if extraction is None:
        return nodes.extract_features_task(
            dict(state.volumes), _region_node(state), settings=chosen,
            device=settings.device, case_id=settings.case_id, scene=target)
    if settings.preprocess:
        log.warning(
            "the classifier learnt features of images as read, and with Preprocess on the "
            "module measures the preprocessed volumes: turn Preprocess off for a prediction "
            "on the features it learnt (the batch measures the images as read by itself).")
    volumes = {m: state.unregistered.get(m, node) for m, node in state.volumes.items()}
    transforms = {}
    for m, transform_node in state.transforms.items():
        # (a volume placed under its registration already lies in the reference's frame)
        if transform_node is not None and volumes[m].GetParentTransformNode() is not (
                transform_node):
            transforms[m] = mrml.transform_from_transform_node(transform_node)
    return nodes.extract_features_task(
        volumes, _region_node(state), settings=extraction["feature_settings"],
        device=settings.device, case_id=settings.case_id, scene=target, own_grids=True,
        transforms=transforms)
