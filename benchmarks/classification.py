"""The sarcoma outcome: predict lung metastases (``LungMets``) of the development patients.

Two pipelines, both validated by repeated stratified NESTED cross-validation (feature
selection and hyper-parameters inside the inner loop only), AUC with a bootstrap 95% CI:

(a) the Vallieres et al. 2015 recipe (Phys. Med. Biol. 60:5471): texture features (GLCM,
    GLRLM, GLSZM, NGTDM) of the wavelet-fused PET/MR-T1 image, then logistic regression on
    a few features chosen by a relevance-minus-redundancy criterion (their "gain";
    mRMR here), the model order (1-4) chosen in the inner loop.
(b) this project's best pipeline, fixed before looking at the figures: every IBSI family
    on CT, PET, MR-T1 and the fused image, a correlation filter, mRMR, and the classifier
    itself (L1/L2 logistic regression, SVM, random forest, gradient boosting) chosen in
    the inner loop (``classifier="auto"``), so choosing the "best" model cannot leak.

With 20 patients (5 positive) each test fold holds one positive case; the confidence
intervals are necessarily wide. A label-permutation run of (a) shows where chance lies.
The code takes any cohort folder in the STS layout with an outcomes CSV (``--cohort``,
``--outcomes``), so it is ready for a larger cohort.

Needs ``MultiModalAnalysisLib.features.extract_features`` (issue 5, features) and
``MultiModalAnalysisLib.fusion.wavelet_fusion`` (issue 3, fusion) -- merged from their
branches. Run, under the shared CPU lock:

    flock /tmp/mma-cpu.lock .venv/bin/python benchmarks/classification.py

Features are cached in ``benchmarks/.cache/`` (``--recompute`` ignores the cache); results
go to ``benchmarks/results/classification/`` (JSON, ROC and confusion-matrix PNGs) and a
Markdown section for ``docs/benchmarks.md`` is printed. ``--ship DIR`` also trains the
demo's classifier (features as the demo computes them) on the whole cohort and saves it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from MultiModalAnalysisLib.case import Case, load_case  # noqa: E402
from MultiModalAnalysisLib.classification import (  # noqa: E402
    ClassifierSettings,
    evaluate_cv,
    train_classifier,
)
from MultiModalAnalysisLib.preprocess import (  # noqa: E402
    crop_to_mask,
    resample_to_reference,
    resample_to_spacing,
)
from MultiModalAnalysisLib.sample_data import development_data_dir  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results" / "classification"
LABEL = "LungMets"
MASK = "MR_T1_mask"  # the three masks coincide (data README); the fused image is on MR's frame

# (a) Vallieres et al. 2015: fusion of PET and MR-T1 at equal weight (the middle of their
# 1/4..3/4 range, fixed a priori: tuning it on the 20 patients would leak), texture on an
# isotropic grid, a fixed number of grey levels.
FUSION = {"weight_b": 0.5, "wavelet": "sym8", "level": 1}
FUSION_SPACING_MM = 2.0
TEXTURE_SETTINGS = {
    "families": ["cm", "rlm", "szm", "ngt"],
    "texture_aggregation": ["3D"],
    "discretisation_method": "fixed_bin_number",
    "discretisation_bin_number": 32,
}
RECIPE_A = ClassifierSettings(
    classifier="logistic_l2",
    selection="mrmr",
    n_features=[1, 2, 3, 4],
    param_grid={"classify__C": [1e3]},  # nearly unpenalised, as in the paper
    cv_folds=5,
    cv_repeats=10,
)

# (b) every family per modality, with IBSI's advice: fixed bin sizes in physical units for
# CT (HU) and PET (SUV), a fixed bin number for MR (arbitrary units).
MODALITY_SETTINGS = {
    "CT": {"discretisation_method": "fixed_bin_size", "discretisation_bin_width": 25.0,
           "resegmentation_range": [-1000.0, 3000.0]},
    "PET": {"discretisation_method": "fixed_bin_size", "discretisation_bin_width": 0.5,
            "resegmentation_range": [0.0, None]},
    "MR_T1": {"discretisation_method": "fixed_bin_number", "discretisation_bin_number": 32},
    "FUSED": {"discretisation_method": "fixed_bin_number", "discretisation_bin_number": 32},
}
COMMON_SETTINGS = {"new_spacing": [FUSION_SPACING_MM] * 3, "texture_aggregation": ["3D"]}
RECIPE_B = ClassifierSettings(
    classifier="auto",
    selection="mrmr",
    n_features=[2, 4, 8],
    correlation_threshold=0.9,
    cv_folds=5,
    cv_repeats=10,
)


def rescale_in_box(image: sitk.Image) -> sitk.Image:
    """Intensities mapped to [0, 1] (1st-99th percentile of the box): PET (SUV) and MR
    (arbitrary units) must share a range before their wavelet coefficients are mixed."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    low, high = np.percentile(array, [1, 99])
    scaled = np.clip((array - low) / max(high - low, 1e-6), 0.0, 1.0)
    result = sitk.GetImageFromArray(scaled)
    result.CopyInformation(image)
    return result


def fused_pet_mr(case: Case) -> tuple[sitk.Image, sitk.Image]:
    """(fused PET/MR-T1 image, tumour mask) on an isotropic grid around the tumour."""
    from MultiModalAnalysisLib.fusion import wavelet_fusion

    mask = case.mask(MASK)
    box = crop_to_mask(case.image("MR_T1"), mask, margin_mm=10.0)
    grid = resample_to_spacing(box, FUSION_SPACING_MM)
    mr = rescale_in_box(grid)
    pet = rescale_in_box(resample_to_reference(case.image("PET"), grid, name="PET"))
    fused = wavelet_fusion(mr, pet, **FUSION)
    return fused, resample_to_reference(mask, grid, is_label=True, name="tumour mask")


def case_features(case: Case, recipe: str) -> dict[str, float]:
    """The features of one case for recipe ``"a"`` (fused texture) or ``"b"`` (all)."""
    from MultiModalAnalysisLib.features import extract_features

    fused, fused_mask = fused_pet_mr(case)
    if recipe == "a":
        return extract_features({"FUSED": fused}, fused_mask, TEXTURE_SETTINGS, device="cpu")
    values: dict[str, float] = {}
    for modality in ("CT", "PET", "MR_T1"):
        settings = {**COMMON_SETTINGS, **MODALITY_SETTINGS[modality]}
        values.update(extract_features({modality: case.image(modality)},
                                       case.mask(f"{modality}_mask"), settings, device="cpu"))
    values.update(extract_features({"FUSED": fused}, fused_mask,
                                   {**COMMON_SETTINGS, **MODALITY_SETTINGS["FUSED"]},
                                   device="cpu"))
    return values


def cohort_features(cohort: Path, outcomes: pd.Series, recipe: str, recompute: bool):
    """(feature table indexed by case id, seconds per case), cached by recipe settings."""
    key = json.dumps([recipe, FUSION, FUSION_SPACING_MM, TEXTURE_SETTINGS, MODALITY_SETTINGS,
                      COMMON_SETTINGS, sorted(outcomes.index)], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    cached = CACHE / f"sts_features_{recipe}_{digest}.csv"
    if cached.is_file() and not recompute:
        table = pd.read_csv(cached, dtype={"case_id": str}).set_index("case_id")
        return table, float("nan")
    rows, start = {}, time.perf_counter()
    for case_id in outcomes.index:
        case = load_case(cohort / case_id, ("CT", "PET", "MR_T1"))
        rows[case_id] = case_features(case, recipe)
        print(f"  features ({recipe}) {case_id}: {len(rows[case_id])}", file=sys.stderr)
    seconds = (time.perf_counter() - start) / len(rows)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "case_id"
    CACHE.mkdir(parents=True, exist_ok=True)
    table.to_csv(cached)
    return table, seconds


def permutation_null(features, labels, settings, n_permutations: int) -> np.ndarray:
    """Nested-CV AUCs of the same recipe with shuffled labels (one repeat each)."""
    quick = ClassifierSettings(**{**settings.to_dict(), "cv_repeats": 1, "n_bootstrap": 200})
    return np.array([
        evaluate_cv(features, np.random.default_rng(seed).permutation(labels), quick).auc
        for seed in range(n_permutations)
    ])


DEMO_FEATURES_NOTE = (
    "(features as `mma demo` computes them: each modality preprocessed with its preset and "
    "resampled onto the CT grid, then IBSI features inside CT_mask with CT fixed bin width "
    "25 HU, PET fixed bin width 0.5 SUV, MR_T1 32 bins, 3-D texture: feature_settings.json "
    "beside this card, from demo_feature_settings() in MultiModalAnalysisLib/demo.py; "
    "`mma batch --settings feature_settings.json --registration none --mask-column CT_mask` "
    "measures a cohort so. Features computed with other settings are on other scales: the "
    "probabilities would mean nothing)"
)


def ship_demo_classifier(cohort: Path, outcomes: pd.Series, folder: Path) -> None:
    """Train the demo's classifier on features computed exactly as ``mma demo`` does.

    Needs the demo's feature step (features branch): same preprocessing, same grid, same
    settings, so the demo's ``features.csv`` fits the model.
    """
    from MultiModalAnalysisLib.demo import (
        DEMO_FEATURE_SETTINGS,
        REFERENCE,
        TUMOUR_MASK,
        demo_feature_settings,
    )
    from MultiModalAnalysisLib.features import extract_features
    from MultiModalAnalysisLib.pipeline import preprocess_case, resample_case_to_reference

    rows = {}
    for case_id in outcomes.index:
        case = load_case(cohort / case_id, tuple(DEMO_FEATURE_SETTINGS))
        on_grid = resample_case_to_reference(preprocess_case(case), REFERENCE)
        rows[case_id] = extract_features(
            {m: on_grid.image(m) for m in DEMO_FEATURE_SETTINGS}, on_grid.mask(TUMOUR_MASK),
            demo_feature_settings())
        print(f"  demo features {case_id}", file=sys.stderr)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "case_id"
    settings = ClassifierSettings(**{**RECIPE_B.to_dict(), "cv_repeats": 5})
    train_classifier(table, outcomes.loc[table.index], settings, label_column=LABEL,
                     source=f"{cohort} {DEMO_FEATURES_NOTE}", output=folder)
    demo_feature_settings().save(folder / "feature_settings.json")
    print(f"shipped classifier written to {folder}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data = development_data_dir()
    parser.add_argument("--cohort", type=Path, default=data / "sts" if data else None)
    parser.add_argument("--outcomes", type=Path, default=None,
                        help="CSV: case id, LungMets (default: <cohort>/outcomes.csv)")
    parser.add_argument("--repeats", type=int, default=10, help="outer CV repeats")
    parser.add_argument("--permutations", type=int, default=20,
                        help="label permutations of recipe (a)")
    parser.add_argument("--recompute", action="store_true", help="ignore cached features")
    parser.add_argument("--ship", type=Path, default=None,
                        help="also train the demo's classifier and save it here")
    args = parser.parse_args(argv)
    if args.cohort is None or not args.cohort.is_dir():
        raise SystemExit("development data not found: set MMA_DATA or pass --cohort")
    warnings.filterwarnings("ignore", category=UserWarning)
    outcomes_csv = args.outcomes or args.cohort / "outcomes.csv"
    outcomes = pd.read_csv(outcomes_csv)
    outcomes = outcomes.set_index(outcomes.columns[0])[LABEL].dropna().astype(int)
    outcomes.index = outcomes.index.astype(str)

    RESULTS.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict] = {}
    for name, recipe, settings in (("a", "a", RECIPE_A), ("b", "b", RECIPE_B)):
        settings = ClassifierSettings(**{**settings.to_dict(), "cv_repeats": args.repeats})
        features, seconds = cohort_features(args.cohort, outcomes, recipe, args.recompute)
        labels = outcomes.loc[features.index].to_numpy()
        start = time.perf_counter()
        result = evaluate_cv(features, labels, settings)
        result.save(RESULTS / name, title=f"STS {LABEL}: recipe ({name})")
        report[name] = {"summary": result.summary(), "n_features": features.shape[1],
                        "feature_seconds_per_case": seconds,
                        "cv_seconds": time.perf_counter() - start,
                        "settings": settings.to_dict()}
        print(f"({name}) {result.describe()}", file=sys.stderr)
    null = permutation_null(*_recipe_a_inputs(args, outcomes), RECIPE_A, args.permutations)
    report["a"]["permutation_auc"] = {"n": len(null), "mean": float(null.mean()),
                                      "p95": float(np.percentile(null, 95)),
                                      "p_value": float((1 + np.sum(null >= report["a"]
                                                       ["summary"]["auc"])) / (1 + len(null)))}
    (RESULTS / "classification.json").write_text(json.dumps(report, indent=2, default=str))
    print(markdown(report, args))
    if args.ship:
        ship_demo_classifier(args.cohort, outcomes, args.ship)
    return 0


def _recipe_a_inputs(args, outcomes):
    features, _ = cohort_features(args.cohort, outcomes, "a", recompute=False)
    return features, outcomes.loc[features.index].to_numpy()


def markdown(report: dict, args) -> str:
    """The section for docs/benchmarks.md."""
    lines = [
        "## Classification: the sarcoma outcome (`benchmarks/classification.py`)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"date {datetime.date.today()}. Cohort: {args.cohort} "
        f"({report['a']['summary']['n_cases']} patients, "
        f"{report['a']['summary']['n_positive']} with lung metastases). Validation: "
        f"{report['a']['summary']['validation']}; AUC averaged over repeats, 95% CI by a "
        "stratified case bootstrap.",
        "",
        "| pipeline | features | AUC (95% CI) | sensitivity | specificity | balanced acc. |"
        " CV time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"a": "(a) Vallieres 2015: fused PET/MR-T1 texture + logistic regression",
             "b": "(b) all families, CT/PET/MR-T1/fused, mRMR, classifier chosen inside"}
    for key, row in report.items():
        s = row["summary"]
        lines.append(
            f"| {names[key]} | {row['n_features']} | {s['auc']:.3f} ({s['auc_ci'][0]:.3f}-"
            f"{s['auc_ci'][1]:.3f}) | {s['sensitivity']['mean']:.2f} | "
            f"{s['specificity']['mean']:.2f} | {s['balanced_accuracy']['mean']:.2f} | "
            f"{row['cv_seconds']:.0f} |"
        )
    null = report["a"]["permutation_auc"]
    lines += [
        "",
        f"Recipe (a) with permuted labels ({null['n']} permutations): mean AUC "
        f"{null['mean']:.3f}, 95th percentile {null['p95']:.3f}; permutation p = "
        f"{null['p_value']:.3f}.",
        "Vallieres et al. report a bootstrap AUC of about 0.98 on 51 patients (PET, T1 and "
        "T2-FS, their texture parameters optimised on the same cohort); with 20 patients "
        "and 5 events the intervals here are wide and the figures are a feasibility check, "
        "not a replication.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
