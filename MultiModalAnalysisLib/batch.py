"""The whole pipeline over a cohort, headless: a row of features (and a prediction) per case.

Each case is read, preprocessed (the modality presets), registered to its first modality,
segmented (or its own mask is used), measured and, with a classifier, predicted. The Slicer
module's *Batch* step (:func:`workflow.batch_task`) and ``mma batch`` both run
:func:`run_batch`; the settings are the module's :class:`workflow.WorkflowSettings`.

A row measures one region per case: the case's mask, else what the segmentation finds, which
must then be a lesion (method ``model`` or ``threshold``): gmm/kmeans classes cover the whole
image, and their union would measure the whole crop. The segmentation leaves out where a
registered volume has no data; a moving modality's own mask (``PET_mask``) follows its
registration onto the reference grid.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import SimpleITK as sitk

from MultiModalAnalysisLib.errors import (
    ConfigError,
    GeometryError,
    MMAError,
    OperationCancelled,
    for_case,
)
from MultiModalAnalysisLib.modalities import canonical_modality, modality_family
from MultiModalAnalysisLib.progress import ProgressCallback, as_progress, check_cancel

if TYPE_CHECKING:
    import pandas as pd

    from MultiModalAnalysisLib.case import Case
    from MultiModalAnalysisLib.workflow import WorkflowSettings

log = logging.getLogger(__name__)

# segmentations whose labels are a lesion, which a batch row can measure
BATCH_SEGMENTATIONS = ("model", "threshold")
BATCH_REGISTRATIONS = ("rigid", "affine", "deformable", "none")
# a region smaller than this (a 3x3x3 block) is measured with a warning
SMALL_REGION_VOXELS = 27


@dataclass
class CaseResult:
    """What the batch made of one case.

    Attributes:
        row: ``case_id`` and the features (``<modality>_<IBSI tag>``).
        region: the measured region on the reference grid (UInt8, 0/1).
        transforms: moving modality -> its registration (fixed -> moving).
        registrations: moving modality -> its :class:`registration.RegistrationResult`
            (quality metrics, ``save`` for the warped image, transform and QC figure).
        seconds: the case's wall time.
        sources: image or mask name -> the file it was read from.
        warnings: what the case's work warned about (the log's warnings while it ran).
        stages: wall seconds per stage (read, preprocess, register, mask or segment,
            features).
    """

    row: dict[str, Any]
    region: sitk.Image
    transforms: dict[str, sitk.Transform] = field(default_factory=dict)
    registrations: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    sources: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)


def given(path: str | Path | None) -> bool:
    """Whether a settings path is set (the module's path fields hold "" or "." when not)."""
    return path is not None and str(path) not in ("", ".")


def refuse_tissue_classes(settings: WorkflowSettings, who: str, instead: str) -> None:
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


def check_batch(settings: WorkflowSettings, modalities: Sequence[str],
                mask_name: str | None) -> list[str]:
    """Refuse, before any work, a batch that cannot run; the modalities, canonical (the
    first is the reference every other one is registered to)."""
    settings.check()
    if settings.registration_type not in BATCH_REGISTRATIONS:
        raise ConfigError(
            f"a batch cannot register by {settings.registration_type} (landmarks are "
            "clicked per case in Slicer): choose rigid, affine, deformable or none for the "
            "batch.")
    if not mask_name:
        refuse_tissue_classes(settings, "a batch measures",
                              "give the name of each case's mask (e.g. CT_mask)")
    wanted = [canonical_modality(m) for m in modalities]
    if not wanted:
        raise ConfigError("a batch needs at least one modality (e.g. CT,PET).")
    if "OTHER" in wanted:
        raise ConfigError(
            "a batch reads each case's images by modality (CT_image.nii.gz, "
            "PET_image.nii.gz, or a manifest's CT, PET ... columns): 'other' names none. "
            "Choose the modality of every input volume (or one its files are named by, "
            "e.g. DWI for DWI_image.nii.gz).")
    if not mask_name and settings.segmentation_method == "threshold" and not any(
            modality_family(m) == "PET" for m in wanted):
        raise ConfigError(
            "a batch's threshold segmentation is PET's 40 % of SUVmax around the hottest "
            "voxel: add PET to the modalities, or give each case's mask (on "
            f"{', '.join(wanted)} a threshold would find tissue, not the lesion).")
    repeated = sorted({m for m in wanted if wanted.count(m) > 1})
    if repeated:
        raise ConfigError(f"the modalities name {', '.join(repeated)} twice: give each once.")
    return wanted


# the feature settings a classifier trained on a feature table was given beside it (the
# shipped one's: benchmarks/classification.py --ship writes it)
CLASSIFIER_FEATURE_SETTINGS = "feature_settings.json"


def with_classifier_settings(settings: WorkflowSettings, *, warn: bool = True
                             ) -> WorkflowSettings:
    """``settings`` with the feature settings its classifier's folder holds
    (:data:`CLASSIFIER_FEATURE_SETTINGS`), when no feature settings were chosen: the
    settings its training features were computed with (a copy; ``settings`` is kept).
    Other feature settings chosen are kept, with a warning (``warn``: the caller that
    goes on to :func:`run_batch`, which warns, need not)."""
    from dataclasses import replace

    if not given(settings.classifier):
        return settings
    beside = Path(settings.classifier) / CLASSIFIER_FEATURE_SETTINGS
    if not beside.is_file():
        return settings
    if not given(settings.feature_settings):
        log.info("the classifier's folder holds the feature settings its features were "
                 "computed with (%s): measuring with them.", beside)
        return replace(settings, feature_settings=str(beside))
    if Path(settings.feature_settings).resolve() == beside.resolve():
        return settings  # (already those: chosen, or set by an earlier call)
    from MultiModalAnalysisLib.features import load_settings

    if warn and load_settings(settings.feature_settings) != load_settings(beside):
        log.warning("the feature settings %s differ from those the classifier's features "
                    "were computed with (%s): its predictions would read features on other "
                    "scales.", settings.feature_settings, beside)
    return settings


def classifier_and_extraction(path: Any, settings: WorkflowSettings,
                              who: str = "the batch") -> tuple[Any, Any]:
    """The batch's classifier, loaded (or, when it cannot be, its path: the predictions
    then say why), and how its training features were computed (None when it does not
    record it: trained on a feature table)."""
    from MultiModalAnalysisLib.classification import load_classifier

    try:
        classifier = load_classifier(path)
    except MMAError:
        return path, None  # add_predictions reports the error in prediction_error
    extraction = (getattr(classifier, "metadata", None) or {}).get("extraction")
    if not extraction or extraction.get("feature_settings") is None:
        chosen = (f"the feature settings {settings.feature_settings}"
                  if given(settings.feature_settings) else "the default feature settings")
        log.warning(
            "the classifier %s was trained on a feature table and does not record how its "
            "features were computed: %s measures with %s, and its predictions mean something "
            "only if those settings and the preprocessing match the ones its training "
            "features used (see its model card).", path, who, chosen)
        return classifier, None
    if given(settings.feature_settings):
        from MultiModalAnalysisLib.features import load_settings

        if load_settings(settings.feature_settings).to_dict() != extraction["feature_settings"]:
            log.warning(
                "%s measures with the classifier's feature settings, those its training "
                "features were computed with, not with %s: other settings would give "
                "features the classifier did not learn.", who, settings.feature_settings)
    return classifier, extraction


def run_case(case: Case, modalities: Sequence[str], mask_name: str | None,
             settings: WorkflowSettings, progress: ProgressCallback | None = None,
             cancel: threading.Event | None = None,
             extraction: dict | None = None, model: Any = None) -> CaseResult:
    """One batch row: the features of every modality on the reference grid (the moving
    ones resampled through their registration) in the region. With ``extraction`` (a
    classifier trained from images records it), they are measured as ``mma classify``
    measures them instead: with its settings, on the images as read, each on its own grid
    (:func:`_as_trained`), and images whose values do not fit their modality are refused."""
    import numpy as np

    from MultiModalAnalysisLib.features import extract_features
    from MultiModalAnalysisLib.images import require_plausible_units, validate_mask
    from MultiModalAnalysisLib.preprocess import (
        apply_modality_preset,
        mask_on_grid,
        resample_to_reference,
    )
    from MultiModalAnalysisLib.segmentation.inputs import field_of_view

    started = clock = time.perf_counter()
    stages: dict[str, float] = {}

    def lap(stage: str) -> None:  # the stage's wall time, for the record
        nonlocal clock
        now = time.perf_counter()
        stages[stage] = round(now - clock, 3)
        clock = now

    report = as_progress(progress)
    case.require(modalities)
    reference = modalities[0]
    images = {m: case.images[m] for m in modalities}
    if extraction is not None:  # as mma classify: swapped inputs would predict nonsense
        require_plausible_units(images, f"the classifier (case {case.case_id})")
    if settings.preprocess:
        for m in modalities:
            images[m] = apply_modality_preset(images[m], m, cancel=cancel)
    report(0.2, f"{case.case_id}: preprocessed")
    lap("preprocess")
    fixed = images[reference]
    covered = np.ones(sitk.GetArrayViewFromImage(fixed).shape, bool)
    transforms: dict[str, sitk.Transform] = {}  # a moving modality's own mask follows it
    registrations: dict[str, Any] = {}
    for number, m in enumerate(modalities[1:]):
        check_cancel(cancel, "the batch")
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
            registrations[m] = result
        covered &= field_of_view(images[m], fixed, transform)
        images[m] = warped
        if transform is not None:
            transforms[m] = transform
        report(0.2 + 0.3 * (number + 1) / max(len(modalities) - 1, 1),
               f"{case.case_id}: {m} registered")
    lap("register")
    if mask_name:
        from MultiModalAnalysisLib.fusion import mask_transform

        region = mask_on_grid(case.mask(mask_name), fixed, f"{case.case_id}'s {mask_name}",
                              transform=mask_transform(mask_name, transforms))
        inside = sitk.GetArrayViewFromImage(region).astype(bool)
        outside = int((inside & ~covered).sum())
        if outside > 0.5 * inside.sum():
            raise GeometryError(
                f"case {case.case_id}: {outside} of the {int(inside.sum())} voxels of "
                f"{mask_name} ({100 * outside / inside.sum():.0f} %) lie outside a registered "
                "volume's field of view, where it is padding: its features would describe "
                "the padding. Check the registration (--save-dir keeps its QC figure) and "
                "the mask.")
        if outside:
            log.warning("case %s: %d of the %d voxels of %s lie outside a registered volume's "
                        "field of view, where it is padding: its features there are not "
                        "measured values.", case.case_id, outside, int(inside.sum()),
                        mask_name)
    else:
        from MultiModalAnalysisLib.segmentation import segment

        inside = sitk.GetImageFromArray(covered.astype(np.uint8))
        inside.CopyInformation(fixed)
        region = segment(images, method=settings.segmentation_method,
                         classes=settings.segmentation_classes,
                         model=model or settings.segmentation_model or None,
                         field_of_view=inside, device=settings.device,
                         cancel=cancel).labels
        report(0.7, f"{case.case_id}: segmented")
    lap("mask" if mask_name else "segment")
    region = sitk.Cast(sitk.NotEqual(region, 0), sitk.sitkUInt8)
    size = region_size(region)
    if size["voxels"] < SMALL_REGION_VOXELS:
        log.warning("case %s: the region measured has %d voxel(s) (%.3g mL): texture and shape "
                    "features of so few voxels mean little. Check the %s.", case.case_id,
                    size["voxels"], size["ml"], mask_name or "segmentation")
    if extraction is None:  # every modality on the reference grid
        feature_settings = (settings.feature_settings if given(settings.feature_settings)
                            else None)
        features = extract_features(images, region, settings=feature_settings,
                                    device=settings.device, cancel=cancel)
    elif mask_name:  # the mask as drawn, onto each image as mma classify takes it
        from MultiModalAnalysisLib.fusion import mask_transform

        features = _as_trained(case, modalities, validate_mask(case.mask(mask_name),
                                                               mask_name),
                               transforms, extraction, settings, cancel,
                               mask_transform(mask_name, transforms))
    else:
        features = _as_trained(case, modalities, region, transforms, extraction, settings,
                               cancel)
    report(1.0, f"{case.case_id}: measured")
    lap("features")
    used = {*modalities, *([mask_name] if mask_name else [])}
    return CaseResult({"case_id": case.case_id, **features}, region, transforms,
                      registrations, time.perf_counter() - started,
                      {k: v for k, v in case.sources.items() if k in used}, stages=stages)


def _as_trained(case: Case, modalities: Sequence[str], region: sitk.Image,
                transforms: dict[str, sitk.Transform], extraction: dict,
                settings: WorkflowSettings, cancel: threading.Event | None,
                region_transform: sitk.Transform | None = None) -> dict:
    """The features a classifier trained from images learnt, as ``mma classify`` measures
    them: with its feature settings, each image as read, on its own grid, the region mapped
    onto it (a registered image's through the registration's inverse). The region is
    resampled as the features' settings resample a mask (``roi_interpolation_method``,
    kept at ``roi_partial_volume_threshold``)."""
    from MultiModalAnalysisLib.features import extract_on_own_grids

    return extract_on_own_grids({m: case.images[m] for m in modalities}, region, transforms,
                                extraction["feature_settings"], device=settings.device,
                                cancel=cancel, region_transform=region_transform)


def add_predictions(table: pd.DataFrame, classifier: Any) -> pd.DataFrame:
    """``table`` with the classifier's ``prediction``, ``probability_<positive class>``
    (:func:`probability_column`) and ``threshold`` for each case that was measured (a
    failed case, with an ``error``, gets none), decided as ``mma classify`` decides. A
    classifier that cannot read the table leaves the
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
            # (named as mma classify names it: a script reads either table alike)
            predicted = predicted.rename(columns={
                "probability": probability_column(classifier)})
            for column in predicted.columns:
                table[column] = predicted[column]
    except MMAError as error:
        log.warning("the batch's classifier could not be applied: %s", error)
        table["prediction_error"] = str(error)
    return table


def probability_column(classifier: Any) -> str:
    """The column of the positive class's probability, as ``mma classify`` names it
    (``probability_1`` for classes 0 / 1)."""
    classes = list(getattr(classifier, "class_names", None) or [0, 1])
    return f"probability_{classes[1]}"


CaseSource = tuple[str, Callable[[], "Case"]]  # a case id and how to read the case


def run_batch(
    cases: Iterable[CaseSource] | Sequence[CaseSource],
    settings: WorkflowSettings,
    *,
    modalities: Sequence[str],
    mask_name: str | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    on_error: str = "record",
    on_case: Callable[[str, CaseResult | None, MMAError | None], None] | None = None,
) -> pd.DataFrame:
    """The pipeline over ``cases``: a table with a row per case, in their order.

    Args:
        cases: ``(case_id, read)`` pairs; ``read()`` returns the :class:`case.Case`
            (called when the case's turn comes, so that a cohort is never held in memory).
        settings: the pipeline's settings (:class:`workflow.WorkflowSettings`).
        modalities: the images every case must have; the first is the reference grid.
        mask_name: each case's mask to measure in (e.g. ``CT_mask``); ``None`` measures
            what the segmentation finds (method ``model`` or ``threshold``).
        on_error: a case that cannot be read or measured gets a row whose ``error`` says
            why and the batch goes on ("record"), or stops the batch ("stop": the error,
            naming the case, is raised after ``on_case`` has been told).
        on_case: called after each case with its id and its result, or its error: for
            writing rows as they come (nothing is lost if the run is stopped).

    With a classifier (``settings.classifier``), the table gains ``prediction``,
    ``probability_<positive class>`` and ``threshold`` (or ``prediction_error``); a
    classifier trained from images measures every case as it was trained (its feature
    settings, the images as read).
    """
    import pandas as pd

    if on_error not in ("record", "stop"):
        raise ConfigError(f"on_error must be 'record' or 'stop', not {on_error!r}.")
    wanted = check_batch(settings, modalities, mask_name)
    settings = with_classifier_settings(settings)
    cases = list(cases)
    report = as_progress(progress)
    classifier = settings.classifier
    extraction = None
    if given(classifier):
        classifier, extraction = classifier_and_extraction(classifier, settings)
    if extraction is not None and settings.registration_type == "deformable":
        raise ConfigError(
            "the classifier was trained from images, each measured on its own grid, so the "
            "batch maps the region back onto each registered image, which a deformable "
            "registration cannot do exactly: choose rigid, affine or none with it.")
    if given(settings.classifier) and extraction is None and not isinstance(classifier,
                                                                         str | Path):
        _require_classifier_features(classifier, wanted, settings)
    model = _segmentation_model(settings, wanted) if not mask_name else None
    from MultiModalAnalysisLib.features.cohort import warnings_name_the_case

    rows = []
    for i, (case_id, read) in enumerate(cases):
        check_cancel(cancel, "the batch")
        step = report.sub(i / len(cases), (i + 1) / len(cases))
        try:
            with _warnings_kept() as warned, warnings_name_the_case(case_id):
                reading = time.perf_counter()
                case = read()
                reading = time.perf_counter() - reading
                result = run_case(case, wanted, mask_name, settings, step, cancel,
                                  extraction, model)
            result.warnings = warned
            result.stages = {"read": round(reading, 3), **result.stages}
            result.seconds += reading
        except OperationCancelled:
            raise
        except Exception as error:  # noqa: BLE001 - one case's failure is recorded, below
            if not isinstance(error, MMAError):
                if on_error == "stop":
                    raise
                # (a bug, or a library's own error: the batch goes on, and the log keeps
                # the traceback)
                log.exception("case %s failed unexpectedly", case_id)
                error = MMAError(f"unexpected {type(error).__name__}: {error}")
            error = for_case(error, case_id)
            error.warnings = list(warned)  # (what the case said before it failed)
            if on_case is not None:
                on_case(case_id, None, error)
            if on_error == "stop":
                raise error from None
            log.warning("%s", error)
            rows.append({"case_id": case_id, "error": str(error)})
            continue
        if given(settings.classifier) and not isinstance(classifier, str | Path):
            # predicted as it is measured, so the rows written so far carry their prediction
            result.row = add_predictions(pd.DataFrame([result.row]), classifier).iloc[
                0].to_dict()
        if on_case is not None:
            on_case(case_id, result, None)
        rows.append(result.row)
    table = pd.DataFrame(rows)
    if given(settings.classifier) and isinstance(classifier, str | Path):
        table = add_predictions(table, classifier)  # (it could not be loaded: says why)
    return table


class _KeptWarnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _warnings_kept():
    """The project's log warnings while the block runs in this thread (for a case's
    record: a warning scrolled past in an hour's log is lost otherwise)."""
    handler = _KeptWarnings()
    logger = logging.getLogger("MultiModalAnalysisLib")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _require_classifier_features(classifier: Any, modalities: Sequence[str],
                                 settings: WorkflowSettings) -> None:
    """Refuse, before any case, a classifier whose features these feature settings do not
    compute (found after an hour's batch, they would leave it without predictions)."""
    from MultiModalAnalysisLib.features import load_settings
    from MultiModalAnalysisLib.features.extract import feature_tags

    names = list(getattr(classifier, "feature_names", None) or [])
    if not names:
        return
    chosen = load_settings(settings.feature_settings if given(settings.feature_settings)
                           else None)
    computed = {f"{m}_{tag}" for m in modalities
                for tag in feature_tags(chosen.for_image(m))}
    missing = [n for n in names if n not in computed]
    if missing:
        which = (f"the feature settings {settings.feature_settings}"
                 if given(settings.feature_settings) else "the default feature settings")
        raise ConfigError(
            f"the classifier reads {len(missing)} feature(s) the batch would not compute "
            f"with {which} and the modalities {', '.join(modalities)} (e.g. "
            f"{', '.join(missing[:3])}): "
            "give the feature settings and modalities its training features were computed "
            "with.")


def _segmentation_model(settings: WorkflowSettings, modalities: Sequence[str]) -> Any:
    """The segmentation model, loaded once for the whole batch; one that reads a modality
    the batch does not load is refused before any case."""
    if settings.segmentation_method != "model":
        return None
    from MultiModalAnalysisLib.segmentation.inference import resolve_model
    from MultiModalAnalysisLib.segmentation.model_file import SegmentationModel

    model = resolve_model(settings.segmentation_model)
    if isinstance(model, SegmentationModel):
        missing = [m for m in model.modalities if canonical_modality(m) not in modalities]
        if missing:
            raise ConfigError(
                f"the segmentation model {settings.segmentation_model} reads "
                f"{', '.join(model.modalities)}: add {', '.join(missing)} to the batch's "
                "modalities.")
    return model


def folder_cases(folders: Iterable[str | Path], modalities: Sequence[str]) -> list[CaseSource]:
    """Case sources from STS-layout case folders (``CT_image.nii.gz`` ...; the id is the
    folder's name)."""
    from MultiModalAnalysisLib.case import load_case

    wanted = [canonical_modality(m) for m in modalities]
    return [(Path(f).name, lambda f=Path(f): load_case(f, wanted)) for f in folders]


def manifest_cases(manifest: Any, modalities: Sequence[str], mask_column: str | None = None,
                   case_ids: Sequence[str] | None = None) -> list[CaseSource]:
    """Case sources from a cohort manifest (a :class:`case.Manifest`): its rows, or those
    of ``case_ids``, in the manifest's order."""
    masks = [manifest.column(mask_column)] if mask_column else []
    for modality in modalities:
        manifest.modality_column(modality)  # a missing column: said before any work
    chosen = manifest.case_ids if case_ids is None else [
        c for c in manifest.case_ids if c in set(case_ids)]
    return [(case_id, lambda case_id=case_id: manifest.load_case(case_id, modalities, masks))
            for case_id in chosen]


# ------------------------------------------------------------------- writing as it goes


def record_path(output: str | Path) -> Path:
    """The record a batch keeps beside its table: ``rows.csv`` -> ``rows.batch.json``."""
    output = Path(output)
    name = output.name
    for suffix in (".csv.gz", ".csv"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output.with_name(f"{name}.batch.json")


def describe_batch(settings: WorkflowSettings, *, manifest: str | Path,
                   modalities: Sequence[str], mask_column: str | None) -> dict[str, Any]:
    """What decides a batch's rows (its inputs and settings, paths made absolute): two runs
    whose descriptions are equal measure a case alike, so one can resume the other."""
    from dataclasses import asdict

    # (what the batch does not use, or what does not change the numbers: the device)
    chosen = {k: v for k, v in asdict(settings).items() if k not in (
        "show_3d", "case_id", "fusion_method", "segmentation_classes", "device")}
    for key in ("segmentation_model", "feature_settings", "classifier"):
        chosen[key] = str(Path(chosen[key]).resolve()) if given(chosen[key]) else ""
        # (the same path with other content measures otherwise: an edited settings file,
        # a retrained model)
        chosen[f"{key}_sha256"] = _fingerprint(Path(chosen[key])) if chosen[key] else ""
    return {"manifest": str(Path(manifest).resolve()),
            "modalities": [canonical_modality(m) for m in modalities],
            "mask_column": mask_column or "", "settings": chosen}


# what a model's folder holds beside the model that does not change what it computes: its
# card and figures (edited without retraining, they must not stop a --resume)
_NOT_THE_MODEL = (".md", ".txt", ".png", ".jpg", ".pdf", ".html")


def _fingerprint(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (their names and contents), documents and
    figures left out (:data:`_NOT_THE_MODEL`)."""
    import hashlib

    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*")
        if p.is_file() and not p.name.lower().endswith(_NOT_THE_MODEL))
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else "").encode())
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class BatchOutput:
    """A batch's table, written after every case (atomically), with a record beside it.

    The table (``output``, CSV) holds a row per case finished so far, in the cohort's order;
    a case that failed has its message in ``error``. Columns of the manifest that are no
    image paths (outcomes, clinical data) follow ``case_id``, so that the table goes
    straight to ``mma train-classifier``. The record (:func:`record_path`, JSON) holds what
    decides the rows (:func:`describe_batch`), and per case its status, time and
    registration metrics. With ``save_dir``, each case's measured region and registrations
    (warped image, transform, metrics, QC figure) are written to ``save_dir/<case_id>/``.

    Use it as ``run_batch``'s ``on_case``; :meth:`finish` writes the final table.
    :meth:`resume` starts from an earlier run's table: its measured cases are kept.
    """

    def __init__(self, output: str | Path, description: dict[str, Any], *,
                 order: Sequence[str], extra: pd.DataFrame | None = None,
                 save_dir: str | Path | None = None, command: str = "") -> None:
        self.output = Path(output)
        self.record = record_path(self.output)
        self.description = description
        self.order = list(order)
        self.extra = extra
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.command = command
        self.rows: dict[str, dict[str, Any]] = {}
        self.cases: dict[str, dict[str, Any]] = {}

    @classmethod
    def resume(cls, output: str | Path, description: dict[str, Any], *,
               sources: Callable[[str], dict[str, str]] | None = None, **options: Any
               ) -> BatchOutput:
        """The batch output of an earlier run with the same description, its measured cases
        kept (those that failed are measured again). Without an earlier table, a new one.

        ``sources(case_id)`` gives the files a case reads now (name -> path): a case whose
        files are other paths, or were rewritten since, is measured again."""
        import json

        import pandas as pd

        out = cls(output, description, **options)
        if not out.output.exists():
            log.info("--resume: %s does not exist yet; every case is measured.", out.output)
            return out
        if not out.record.is_file():
            raise ConfigError(
                f"cannot resume {out.output}: its record {out.record.name}, which mma batch "
                "writes beside the table, is missing, so the settings the rows were measured "
                "with are unknown. Run with --overwrite to measure every case again.")
        try:
            earlier = json.loads(out.record.read_text(encoding="utf-8"))
            table = pd.read_csv(out.output, dtype={"case_id": str})
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot resume {out.output}: it or its record "
                              f"{out.record.name} cannot be read ({error}).") from None
        before = earlier.get("description", {})
        # (files by content, not by where they are: each case's own files are compared
        # below, the settings files and models by their SHA-256)
        changed = [key for key in description
                   if key not in ("settings", "manifest") and before.get(key) != description[key]]
        changed += [f"settings.{key}" for key in description.get("settings", {})
                    if key not in ("segmentation_model", "feature_settings", "classifier")
                    and before.get("settings", {}).get(key) != description["settings"][key]]
        if changed:
            def then_now(key: str) -> str:
                if key.endswith("_sha256"):  # (the hashes themselves say nothing)
                    return f"{key.removesuffix('_sha256')}: the file's content changed"
                return f"{key}: {_lookup(before, key)!r} then, {_lookup(description, key)!r} now"

            raise ConfigError(
                f"cannot resume {out.output}: it was measured with other "
                f"{', '.join(k.removesuffix('_sha256') for k in changed)} ("
                + "; ".join(map(then_now, changed[:3]))
                + "). Resume with the same inputs and settings, or run with --overwrite "
                "to measure every case again.")
        from MultiModalAnalysisLib import __version__

        if earlier.get("mma_version") != __version__:
            log.warning("the rows kept were measured by MultiModalAnalysis %s, and the others "
                        "are measured by %s: run without --resume if the versions measure "
                        "differently.", earlier.get("mma_version"), __version__)
        kept_cases = earlier.get("cases", {})
        dropped = sorted(set(map(str, table["case_id"])) - set(out.order))
        if dropped:
            log.warning("--resume: %d case(s) of %s are no longer in the manifest and are "
                        "left out of the table: %s", len(dropped), out.output.name,
                        ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else ""))
        extra_columns = set(out.extra.columns) - {"case_id"} if out.extra is not None else set()
        for row in table.to_dict("records"):
            case_id = str(row["case_id"])
            error = row.get("error")
            measured = (kept_cases.get(case_id, {}).get("status") == "measured"
                        and (error is None or error == "" or pd.isna(error)))
            if measured and case_id in out.order:
                recorded = kept_cases[case_id].get("inputs")
                if sources is not None and recorded != file_states(sources(case_id)):
                    log.warning("case %s: its files changed since it was measured (another "
                                "path in the manifest, or a file rewritten): measured again.",
                                case_id)
                    continue
                out.rows[case_id] = {k: v for k, v in row.items()
                                     if k not in extra_columns and k != "error"}
                out.cases[case_id] = kept_cases[case_id]
        return out

    @property
    def done(self) -> list[str]:
        """The cases measured (by this run or the one resumed), in the cohort's order."""
        return [c for c in self.order if self.cases.get(c, {}).get("status") == "measured"]

    def __call__(self, case_id: str, result: CaseResult | None,
                 error: MMAError | None) -> None:
        if result is not None:
            self.rows[case_id] = dict(result.row)
            self.cases[case_id] = {
                "status": "measured", "seconds": round(result.seconds, 3),
                "registration": {m: dict(r.metrics) for m, r in result.registrations.items()},
                "stages": dict(result.stages),
                "region": region_size(result.region),
                "warnings": list(result.warnings),
                "inputs": file_states(result.sources),
            }
            if self.save_dir is not None:
                self._save(case_id, result)
        else:
            self.rows[case_id] = {"case_id": case_id, "error": str(error)}
            self.cases[case_id] = {"status": "failed", "error": str(error),
                                   "warnings": list(getattr(error, "warnings", []))}
        self.write()

    def finish(self, table: pd.DataFrame) -> pd.DataFrame:
        """Write ``run_batch``'s table (with its predictions) over the rows kept so far;
        returns the whole table written."""
        for row in table.to_dict("records"):
            self.rows[str(row["case_id"])] = row
        return self.write()

    def table(self) -> pd.DataFrame:
        """The rows so far, in the cohort's order, with the manifest's other columns."""
        import pandas as pd

        ids = [c for c in self.order if c in self.rows]
        table = pd.DataFrame([self.rows[c] for c in ids], columns=None)
        if table.empty:
            return pd.DataFrame({"case_id": []})
        if "error" in table.columns:
            table["error"] = table["error"].fillna("")
            table = table[[c for c in table.columns if c != "error"] + ["error"]]
        if "prediction" in table.columns:  # class 0/1 stays 0/1 beside a failed case's gap
            table["prediction"] = table["prediction"].map(
                lambda v: int(v) if isinstance(v, float) and v.is_integer() else v
            ).astype(object)
        if self.extra is not None and len(self.extra.columns) > 1:
            extra = [c for c in self.extra.columns if c != "case_id" and c not in table.columns]
            table = table.merge(self.extra[["case_id", *extra]], on="case_id", how="left")
            table = table[["case_id", *extra,
                           *[c for c in table.columns if c not in ("case_id", *extra)]]]
        return table

    def write(self) -> pd.DataFrame:
        """Write the table and the record (each to a temporary name, then moved over the
        old one: an interrupted write leaves the previous version whole)."""
        import json
        import os

        table = self.table()
        self.output.parent.mkdir(parents=True, exist_ok=True)
        partial = self.output.with_name(f".~{self.output.name}")
        table.to_csv(partial, index=False)
        os.replace(partial, self.output)
        from MultiModalAnalysisLib import __version__

        record = {"mma_version": __version__, "command": self.command,
                  "description": self.description,
                  "cases": {c: self.cases[c] for c in self.order if c in self.cases}}
        partial = self.record.with_name(f".~{self.record.name}")
        partial.write_text(json.dumps(record, indent=2, default=_jsonable), encoding="utf-8")
        os.replace(partial, self.record)
        return table

    def _save(self, case_id: str, result: CaseResult) -> None:
        from MultiModalAnalysisLib.io import write_image

        folder = self.save_dir / _safe_name(case_id)
        folder.mkdir(parents=True, exist_ok=True)
        write_image(result.region, folder / "region.nii.gz")
        for modality, registration in result.registrations.items():
            registration.save(folder / f"{modality}_registration")


def region_size(region: sitk.Image) -> dict[str, float]:
    """The measured region's voxel count and volume (mL)."""
    import numpy as np

    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(region)))
    return {"voxels": voxels, "ml": round(voxels * float(np.prod(region.GetSpacing())) / 1000,
                                          3)}


def file_states(sources: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each file's path, size and modification time (what tells a rewritten file)."""
    states = {}
    for name, path in sorted(sources.items()):
        try:
            stat = Path(path).stat()
            states[name] = {"path": str(Path(path).resolve()), "bytes": stat.st_size,
                            "modified_ns": stat.st_mtime_ns}
        except OSError:
            states[name] = {"path": str(Path(path).resolve())}
    return states


def manifest_sources(manifest: Any, modalities: Sequence[str], mask_column: str | None
                     ) -> Callable[[str], dict[str, str]]:
    """``sources(case_id)``: the files a manifest's case reads (as :class:`case.Case`
    ``sources`` names them), without reading them."""
    def sources(case_id: str) -> dict[str, str]:
        row = manifest.row(case_id)
        files = {canonical_modality(m): row[manifest.modality_column(m)] for m in modalities}
        if mask_column:
            files[mask_column] = row[manifest.column(mask_column)]
        return {name: str(manifest.resolve(value)) for name, value in files.items()
                if isinstance(value, str) and value.strip()}
    return sources


def _lookup(description: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        description = description.get(part, {}) if isinstance(description, dict) else None
    return description


def _safe_name(case_id: str) -> str:
    """A case id as a folder name (no path separators, no leading dots); an id that had to
    be changed gets a short hash of itself, so that ``A/1`` and ``A_1`` stay apart."""
    import hashlib
    import re

    name = re.sub(r"[^0-9A-Za-z._-]+", "_", case_id).lstrip(".")
    if name != case_id or not name:
        name = f"{name or 'case'}-{hashlib.sha1(case_id.encode()).hexdigest()[:8]}"
    return name


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def manifest_extra(manifest: Any) -> pd.DataFrame:
    """``case_id`` and the manifest's columns that hold no image paths (outcomes, clinical
    data), which a batch's table carries beside the features."""
    from MultiModalAnalysisLib.classification.table import image_path_columns

    cohort = manifest.table
    paths = set(image_path_columns(cohort))
    kept = [str(c) for c in cohort.columns if c != "case_id" and str(c) not in paths]
    return cohort.assign(case_id=cohort["case_id"].astype(str).str.strip())[["case_id", *kept]]
