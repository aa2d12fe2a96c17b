"""``mma demo``: the whole pipeline on the bundled sample patient (STS_002: CT, PET, MR-T1).

The demo is a list of steps (:data:`DEMO_STEPS`) over a shared :class:`DemoState`; each
step does one stage of the pipeline, reports progress, and returns a one-line summary that
the command prints with its timing. Later stages (registration, segmentation, features,
classification) slot in as further steps.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from MultiModalAnalysisLib.case import Case, load_case
from MultiModalAnalysisLib.errors import MMAError
from MultiModalAnalysisLib.images import describe, mask_centroid
from MultiModalAnalysisLib.io import publish_staged, staged_writes, write_image
from MultiModalAnalysisLib.metrics import dice
from MultiModalAnalysisLib.pipeline import preprocess_case, resample_case_to_reference
from MultiModalAnalysisLib.plots import Contour, Overlay, orthogonal_montage
from MultiModalAnalysisLib.preprocess import preset_for
from MultiModalAnalysisLib.progress import Progress, ProgressCallback, as_progress, check_cancel
from MultiModalAnalysisLib.sample_data import sample_case_dir

MODALITIES = ("CT", "PET", "MR_T1")
REFERENCE = "CT"
TUMOUR_MASK = "CT_mask"


@dataclass
class DemoState:
    """What the demo steps share: inputs, intermediate cases, and what was written."""

    case_dir: Path
    output_dir: Path
    case: Case | None = None
    preprocessed: Case | None = None
    fused: Case | None = None  # every modality and mask on the reference (CT) grid
    contours: list[Contour] = field(default_factory=list)  # extra outlines for the montage
    outputs: dict[str, Path] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoStep:
    """One stage of the demo: a name, a share of the progress bar, and the work."""

    name: str
    weight: float
    run: Callable[[DemoState, Progress, threading.Event | None], str]


@dataclass
class DemoResult:
    """What ``run_demo`` did: outputs written, per-step timings and summaries, facts."""

    output_dir: Path
    outputs: dict[str, Path]
    timings: dict[str, float]
    summaries: dict[str, str]
    facts: dict[str, Any]

    @property
    def total_seconds(self) -> float:
        return sum(self.timings.values())


def _require_writable(folder: Path) -> None:
    """Make ``folder`` and check that files can be written there (``MMAError`` if not)."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise MMAError(f"the demo cannot write into {folder} ({error.strerror or error}): "
                       "choose another --output-dir.") from None


def _load(state: DemoState, progress: Progress, cancel: threading.Event | None) -> str:
    if state.case is None:  # (run_demo loads it before anything else)
        state.case = load_case(state.case_dir, MODALITIES)
    progress(1.0, "loaded")
    shapes = "; ".join(f"{m} {describe(state.case.image(m))}" for m in MODALITIES)
    return f"loaded {state.case.case_id} from {state.case_dir}: {shapes}"


def _preprocess(state: DemoState, progress: Progress, cancel: threading.Event | None) -> str:
    state.preprocessed = preprocess_case(
        state.case, modalities=MODALITIES, progress=progress, cancel=cancel
    )
    return "; ".join(f"{m}: {preset_for(m).describe()}" for m in MODALITIES)


def _resample(state: DemoState, progress: Progress, cancel: threading.Event | None) -> str:
    state.fused = resample_case_to_reference(
        state.preprocessed, REFERENCE, progress=progress, cancel=cancel
    )
    return (
        f"resampled {', '.join(m for m in MODALITIES if m != REFERENCE)} and the masks onto "
        f"the {REFERENCE} grid ({describe(state.fused.image(REFERENCE))})"
    )


# The known perturbation of the demo's registration step: 8 degrees and 12 mm in all.
DEMO_PERTURBATION_DEG = (4.0, -3.0, 6.0)
DEMO_PERTURBATION_MM = (7.0, -8.0, 5.0)


def _register(state: DemoState, progress: Progress, cancel: threading.Event | None) -> str:
    """Move the MR by a known rigid transform, register it back to the CT, report the error.

    The MR is moved by changing its geometry (no resampling), so the truth is exact: the
    registration should find the inverse motion. The error is measured at the tumour's
    voxels against the dataset's own MR-CT alignment, and (to separate the registration from
    any offset in that alignment) against the registration of the unmoved MR.
    """
    import math

    import numpy as np
    import SimpleITK as sitk

    from MultiModalAnalysisLib.registration import register
    from MultiModalAnalysisLib.registration.perturb import move_image_rigidly
    from MultiModalAnalysisLib.registration.transforms import compose

    ct, mr = state.case.image("CT"), state.case.image("MR_T1")
    motion = sitk.Euler3DTransform()
    motion.SetCenter(mr.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2 for n in mr.GetSize()]))
    motion.SetRotation(*(math.radians(a) for a in DEMO_PERTURBATION_DEG))
    motion.SetTranslation(DEMO_PERTURBATION_MM)
    moved = move_image_rigidly(mr, motion)
    options = {"fixed_modality": "CT", "moving_modality": "MR_T1", "cancel": cancel}
    result = register(ct, moved, "rigid", progress=progress.sub(0.0, 0.5), **options)
    unmoved = register(ct, mr, "rigid", progress=progress.sub(0.5, 0.9), **options)
    truth = motion.GetInverse()
    tumour = state.case.mask(TUMOUR_MASK)
    index = np.argwhere(sitk.GetArrayViewFromImage(tumour) > 0)[::7]
    points = [tumour.TransformIndexToPhysicalPoint([int(i) for i in k[::-1]]) for k in index]

    def error(expected: sitk.Transform) -> np.ndarray:
        return np.array([np.linalg.norm(np.subtract(result.transform.TransformPoint(p),
                                                    expected.TransformPoint(p)))
                         for p in points])

    start = np.array([np.linalg.norm(np.subtract(p, truth.TransformPoint(p)))
                      for p in points])
    vs_dataset = error(truth)
    vs_unmoved = error(compose(truth, unmoved.transform))
    paths = result.save(state.output_dir / "registration")
    for kind, path in paths.items():  # warped, transform, metrics, qc
        state.outputs[f"registration_{kind}"] = path
    mr_mask = move_image_rigidly(state.case.mask("MR_T1_mask"), motion)
    from MultiModalAnalysisLib.preprocess import resample_to_reference

    state.contours.append(Contour(
        resample_to_reference(mr_mask, ct, transform=result.transform, is_label=True,
                              name="the MR tumour mask"),
        "MR tumour mask, registered", "cyan"))
    state.facts["registration"] = {
        "perturbation_deg": list(DEMO_PERTURBATION_DEG),
        "perturbation_mm": list(DEMO_PERTURBATION_MM),
        "start_error_mm_median": round(float(np.median(start)), 2),
        "error_vs_dataset_alignment_mm_median": round(float(np.median(vs_dataset)), 2),
        "error_vs_dataset_alignment_mm_max": round(float(vs_dataset.max()), 2),
        "error_vs_unmoved_registration_mm_median": round(float(np.median(vs_unmoved)), 2),
        "runtime_s": result.metrics["runtime_s"],
    }
    progress(1.0, "registration checked")
    return (
        f"moved the MR by {math.hypot(*DEMO_PERTURBATION_DEG):.0f} deg / "
        f"{math.hypot(*DEMO_PERTURBATION_MM):.0f} mm (tumour moved {np.median(start):.1f} mm) "
        f"and registered it back to the CT in {result.metrics['runtime_s']:.1f} s: residual "
        f"{np.median(vs_dataset):.1f} mm median in the tumour against the dataset's MR-CT "
        f"alignment, {np.median(vs_unmoved):.1f} mm against registering the unmoved MR"
    )

# Discretisation per modality, as IBSI recommends: fixed bin sizes in physical units for CT
# (HU) and PET (SUV), a fixed bin number for MR (arbitrary units after normalisation).
DEMO_FEATURE_SETTINGS = {
    "CT": {"discretisation_method": "fixed_bin_size", "discretisation_bin_width": 25.0},
    "PET": {"discretisation_method": "fixed_bin_size", "discretisation_bin_width": 0.5},
    "MR_T1": {"discretisation_method": "fixed_bin_number", "discretisation_bin_number": 32},
}


def demo_feature_settings():
    """The demo's feature settings as one :class:`features.FeatureSettings`: 3-D texture,
    and each modality's discretisation (``per_image``). The shipped classifier's features
    were computed with these (its folder holds them as ``feature_settings.json``)."""
    from MultiModalAnalysisLib.features import FeatureSettings

    return FeatureSettings(texture_aggregation=("3D",), per_image={
        modality: dict(settings) for modality, settings in DEMO_FEATURE_SETTINGS.items()})


MAIN_FEATURES = {
    "volume (mL)": ("CT", "morph_volume", 1e-3),
    "sphericity": ("CT", "morph_sphericity", 1.0),
    "max 3-D diameter (mm)": ("CT", "morph_diam", 1.0),
    "CT mean (HU)": ("CT", "stat_mean", 1.0),
    "SUVmax": ("PET", "stat_max", 1.0),
    "SUVpeak": ("PET", "loc_peak_glob", 1.0),
    "MR-T1 GLCM joint entropy": ("MR_T1", "cm_joint_entr_3D_avg", 1.0),
    "PET GLSZM zone size entropy": ("PET", "szm_zs_entr_3D", 1.0),
    "CT NGTDM coarseness": ("CT", "ngt_coarseness_3D", 1.0),
}


def _features(state: DemoState, progress: Progress, cancel: threading.Event | None) -> str:
    import pandas as pd

    from MultiModalAnalysisLib.features import extract_features

    fused, values = state.fused, {"case_id": state.fused.case_id}
    values.update(extract_features({m: fused.image(m) for m in MODALITIES},
                                   fused.mask(TUMOUR_MASK), demo_feature_settings(),
                                   progress=progress, cancel=cancel))
    path = state.output_dir / "features.csv"
    pd.DataFrame([values]).to_csv(path, index=False)
    state.outputs["features"] = path
    table = {
        label: round(values[f"{modality}_{tag}"] * scale, 4)
        for label, (modality, tag, scale) in MAIN_FEATURES.items()
    }
    state.facts["features"] = table
    lines = "\n".join(f"{'':14}{label:<30} {value:>10.4g}" for label, value in table.items())
    return f"{len(values) - 1} IBSI features of the tumour -> {path.name}:\n{lines}"


def _classify(state: DemoState, progress: Progress, cancel: threading.Event | None) -> str:
    """P(lung metastases) of the sample patient from the shipped classifier and the tumour
    features of the features step (``state.outputs["features"]``)."""
    from MultiModalAnalysisLib.classification import load_classifier, read_feature_table
    from MultiModalAnalysisLib.classification.shipped import (
        SHIPPED_CLASSIFIER,
        shipped_classifier_dir,
    )

    folder = shipped_classifier_dir()
    if folder is None:
        return (f"skipped: no shipped classifier (Resources/Models/{SHIPPED_CLASSIFIER}; "
                "`benchmarks/classification.py --ship` trains it)")
    if "features" not in state.outputs:
        return "skipped: the demo computed no tumour features to classify"
    model = load_classifier(folder)
    table = read_feature_table(state.outputs["features"])
    probability = float(model.predict_proba(table.features)[0, 1])
    label = model.metadata["label"]
    cv = model.metadata.get("cross_validation") or {}
    facts = {"model": str(folder), "label": label["column"], "probability": probability,
             "cv_auc": cv.get("auc"), "cv_auc_ci": cv.get("auc_ci")}
    calibrated = (model.metadata.get("model") or {}).get("calibrated")
    summary = (f"P({label['column']} = {label['positive']}) = {probability:.2f}"
               if calibrated is not False else f"score for {label['column']} = "
               f"{label['positive']}: {probability:.2f} (uncalibrated: a rank, not a risk)")
    facts["calibrated"] = calibrated
    cohort = model.metadata["training_cohort"]
    if state.fused.case_id in cohort["case_ids"]:
        # The patient was a training case: the in-sample probability flatters the model;
        # its out-of-fold probability from the cross-validation is the honest one.
        oof = _out_of_fold_probability(folder, state.fused.case_id)
        facts["out_of_fold_probability"] = oof
        summary += (f" (in-sample: {state.fused.case_id} is one of the {cohort['n_cases']} "
                    "training patients" + (f"; out-of-fold {oof:.2f}" if oof is not None
                                           else "") + ")")
    if cv:
        summary += f"; model CV AUC {cv['auc']:.2f} ({cv['auc_ci'][0]:.2f}-{cv['auc_ci'][1]:.2f})"
    state.facts["classification"] = facts
    progress(1.0, "classified")
    return summary


def _out_of_fold_probability(folder: Path, case_id: str) -> float | None:
    import pandas as pd

    path = folder / "cv_predictions.csv"
    if not path.is_file():
        return None
    table = pd.read_csv(path, dtype={"case_id": str}).set_index("case_id")
    return float(table.loc[case_id, "probability_mean"]) if case_id in table.index else None


def _segment(state: DemoState, progress: Progress, cancel: threading.Event | None) -> str:
    from MultiModalAnalysisLib.segmentation import segment
    from MultiModalAnalysisLib.segmentation.model_file import shipped_model_path

    model = shipped_model_path("sts_gtv")
    # The model prepares the loaded images as in its training (presets on its own grid);
    # the labels come back on the CT grid (the first image). No test-time flips: the demo
    # stays fast.
    result = segment(
        {m: state.case.image(m) for m in MODALITIES}, "model", model=model, device="cpu",
        tta=False, progress=progress, cancel=cancel,
    )
    tumour = result.mask(1)
    expert = state.fused.mask(TUMOUR_MASK)
    score = dice(tumour, expert)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(tumour)
    volume_ml = shape.GetPhysicalSize(1) / 1000.0 if shape.HasLabel(1) else 0.0
    path = state.output_dir / f"tumour_model_on_{REFERENCE}.nii.gz"
    state.outputs["segmentation"] = write_image(result.labels, path)
    state.contours.append(Contour(tumour, "tumour (shipped model)", "magenta"))
    trained_on = state.case.case_id in result.info.get("training_cases", ())
    state.facts["segmentation"] = {
        "model": str(model),
        "tumour_volume_ml": round(volume_ml, 1),
        "dice_vs_expert": round(score, 3),
        "note": (f"{state.case.case_id} was one of the model's training patients, so this "
                 "Dice is a training-set figure; see the model card for cross-validated Dice."
                 if trained_on else f"{state.case.case_id} is not among the model's training "
                 "patients (by case id)."),
    }
    return (f"shipped model sts_gtv: tumour {volume_ml:.1f} ml, Dice {score:.3f} against the "
            f"expert mask ({state.case.case_id} "
            f"{'was in its training set' if trained_on else 'was not among its training cases'})")


def _write_volumes(state: DemoState, progress: Progress, cancel: threading.Event | None) -> str:
    written = []
    for i, modality in enumerate(MODALITIES):
        check_cancel(cancel, "writing the demo outputs")
        path = state.output_dir / f"{modality}_preprocessed_on_{REFERENCE}.nii.gz"
        state.outputs[f"{modality}_preprocessed"] = write_image(state.fused.image(modality), path)
        written.append(path.name)
        progress((i + 1) / len(MODALITIES), f"wrote {path.name}")
    return f"wrote {', '.join(written)}"


def _montage(state: DemoState, progress: Progress, cancel: threading.Event | None) -> str:
    fused = state.fused
    tumour = fused.mask(TUMOUR_MASK)
    centre = mask_centroid(tumour)
    path = orthogonal_montage(
        {m: fused.image(m) for m in MODALITIES},
        centre,
        state.output_dir / "montage.png",
        overlays=[Overlay(fused.image("CT"), fused.image("PET"), "PET on CT")],
        contours=[Contour(tumour, "tumour (expert GTV)", "lime"), *state.contours],
        title=f"{fused.case_id}: CT, PET, MR-T1 on the CT grid, through the tumour centre",
    )
    state.outputs["montage"] = path
    progress(1.0, "montage written")
    return f"montage through the tumour centre {tuple(round(c, 1) for c in centre)} mm"


DEMO_STEPS: list[DemoStep] = [
    DemoStep("load", 0.05, _load),
    DemoStep("preprocess", 0.5, _preprocess),
    DemoStep("resample", 0.1, _resample),
    DemoStep("register", 0.2, _register),
    DemoStep("segment", 0.2, _segment),
    DemoStep("features", 0.15, _features),
    DemoStep("classify", 0.02, _classify),  # after the features step, which it reads
    DemoStep("write", 0.1, _write_volumes),
    DemoStep("montage", 0.25, _montage),
]


def run_demo(
    output_dir: str | Path = "mma-demo-output",
    case_dir: str | Path | None = None,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    log: Callable[[str], None] | None = print,
) -> DemoResult:
    """Run every demo step on the sample patient and write the outputs to ``output_dir``.

    Args:
        output_dir: where the volumes, the montage and ``report.json`` go.
        case_dir: a case folder in the STS layout (default: the bundled STS_002).
        progress: ``progress(fraction, message)`` callback.
        cancel: stops the demo when set.
        log: where step summaries go (``None``: silent).
    """
    output_dir = Path(output_dir)
    # Every step writes into a staging folder, moved into ``output_dir`` when the demo is
    # done: a demo stopped half-way (Ctrl-C, an error) leaves an earlier run's outputs
    # whole, never one patient's registration beside another's features and report.
    case_dir = Path(case_dir) if case_dir else sample_case_dir()
    # Before any output or long work: a case that cannot be read, or a folder that cannot
    # be written, fails now rather than after the first steps.
    case = load_case(case_dir, MODALITIES)
    _require_writable(output_dir)
    if log is not None:
        log(f"mma demo: {case.case_id} from {case_dir}, writing to {output_dir.resolve()}")
    report = as_progress(progress)
    total = sum(step.weight for step in DEMO_STEPS)
    done = 0.0
    timings: dict[str, float] = {}
    summaries: dict[str, str] = {}
    with staged_writes(output_dir, "demo") as staging:
        state = DemoState(case_dir, staging)
        state.case = case
        try:
            for step in DEMO_STEPS:
                check_cancel(cancel, "the demo")
                start = time.perf_counter()
                summary = step.run(
                    state, report.sub(done / total, (done + step.weight) / total), cancel
                )
                timings[step.name] = time.perf_counter() - start
                summaries[step.name] = summary
                done += step.weight
                if log is not None:
                    log(f"[{step.name:>10}] {timings[step.name]:6.2f} s  {summary}")
        except BaseException:
            if log is not None and len(list(output_dir.iterdir())) > 1:
                log(f"mma demo stopped: {output_dir} keeps the earlier run's outputs as "
                    "they were.")
            raise
    publish_staged(staging, output_dir)
    outputs = {k: output_dir / Path(v).relative_to(staging) for k, v in state.outputs.items()}
    report_path = output_dir / "report.json"
    outputs["report"] = report_path
    result = DemoResult(output_dir, outputs, timings, summaries, state.facts)
    report_path.write_text(json.dumps(_report(result), indent=2, default=str), encoding="utf-8")
    return result


def _report(result: DemoResult) -> dict[str, Any]:
    # (paths relative to the report's folder: they were relative to where mma ran)
    return {
        "outputs": {k: os.path.relpath(v, result.output_dir)
                    for k, v in result.outputs.items()},
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "summaries": result.summaries,
        "facts": result.facts,
    }
