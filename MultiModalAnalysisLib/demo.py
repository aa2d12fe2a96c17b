"""``mma demo``: the whole pipeline on the bundled sample patient (STS_002: CT, PET, MR-T1).

The demo is a list of steps (:data:`DEMO_STEPS`) over a shared :class:`DemoState`; each
step does one stage of the pipeline, reports progress, and returns a one-line summary that
the command prints with its timing. Later stages (registration, segmentation, features,
classification) slot in as further steps.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from MultiModalAnalysisLib.case import Case, load_case
from MultiModalAnalysisLib.images import describe, mask_centroid
from MultiModalAnalysisLib.io import write_image
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


def _load(state: DemoState, progress: Progress, cancel: threading.Event | None) -> str:
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


# Registration (rigid recovery of a perturbed MR), segmentation (the shipped model, Dice
# against the expert mask), features and classification are further steps inserted here.


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
    state.facts["segmentation"] = {
        "model": str(model),
        "tumour_volume_ml": round(volume_ml, 1),
        "dice_vs_expert": round(score, 3),
        "note": f"{state.case.case_id} was one of the model's training patients, so this "
        "Dice is a training-set figure; see the model card for cross-validated Dice.",
    }
    return (f"shipped model sts_gtv: tumour {volume_ml:.1f} ml, Dice {score:.3f} against the "
            f"expert mask ({state.case.case_id} was in its training set)")


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
    DemoStep("segment", 0.2, _segment),
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
    output_dir.mkdir(parents=True, exist_ok=True)
    state = DemoState(Path(case_dir) if case_dir else sample_case_dir(), output_dir)
    report = as_progress(progress)
    total = sum(step.weight for step in DEMO_STEPS)
    done = 0.0
    timings: dict[str, float] = {}
    summaries: dict[str, str] = {}
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
    report_path = output_dir / "report.json"
    state.outputs["report"] = report_path
    result = DemoResult(output_dir, dict(state.outputs), timings, summaries, state.facts)
    report_path.write_text(json.dumps(_report(result), indent=2, default=str))
    return result


def _report(result: DemoResult) -> dict[str, Any]:
    return {
        "outputs": {k: str(v) for k, v in result.outputs.items()},
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "summaries": result.summaries,
        "facts": result.facts,
    }
