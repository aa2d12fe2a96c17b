"""Segmentation benchmark on the 20 STS patients (CT, PET, MR-T1; target: the CT GTV mask).

Patient-level 5-fold cross-validation, Dice and HD95 per fold for
  (a) PET 40 %-of-SUVmax threshold (the component holding SUVmax),
  (b) a 3-class multichannel GMM (CT, PET, MR-T1) inside a box around the PET maximum,
  (c) the deep model (the shipped recipe, trained on the 16 other patients of each fold),
plus the model's CPU inference time per case and its training time.

Steps (each can run on its own; results are kept under --work, so a fold can be re-run):
  .venv/bin/python benchmarks/segmentation.py prepare      # manifest + cached network inputs
  .venv/bin/python benchmarks/segmentation.py baselines    # (a) and (b) on every patient
  .venv/bin/python benchmarks/segmentation.py fold 0       # train fold 0, evaluate its patients
  .venv/bin/python benchmarks/segmentation.py report       # Markdown for docs/benchmarks.md
Heavy steps should run under the shared lock: ``flock /tmp/mma-cpu.lock <command>``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.case import load_case, manifest_from_folder
from MultiModalAnalysisLib.images import validate_mask
from MultiModalAnalysisLib.metrics import dice, hausdorff_95
from MultiModalAnalysisLib.preprocess import crop_to_mask, resample_to_reference
from MultiModalAnalysisLib.sample_data import development_data_dir
from MultiModalAnalysisLib.segmentation import (
    clean_labels,
    component_at,
    segment,
    suv_fraction_threshold,
    train_segmentation,
)

MODALITIES = ["CT", "PET", "MR_T1"]
LABEL = "CT_mask"
FOLDS = 5
SPLIT_SEED = 0
# The shipped model's recipe (Resources/Models/sts_gtv/README.md); every fold uses it as is.
RECIPE = {
    "epochs": 40,
    "iterations_per_epoch": 50,
    "patch_size": (64, 64, 32),
    "batch_size": 1,
    "patches_per_case": 2,
    "learning_rate": 2e-3,
    "seed": 0,
}
GMM_BOX_MARGIN_MM = 20.0


def folds(case_ids: list[str]) -> list[list[str]]:
    """Five disjoint groups of patients (a seeded permutation, then consecutive groups)."""
    order = np.random.default_rng(SPLIT_SEED).permutation(sorted(case_ids)).tolist()
    return [sorted(order[k::FOLDS]) for k in range(FOLDS)]


def scores(labels: sitk.Image, truth: sitk.Image) -> dict[str, float]:
    found = sitk.Cast(sitk.NotEqual(labels, 0), sitk.sitkUInt8)
    result = {"dice": dice(found, truth)}
    result["hd95_mm"] = hausdorff_95(found, truth) if sitk.GetArrayViewFromImage(found).any() \
        else float("nan")
    return result


def pet_threshold(images: dict[str, sitk.Image]) -> sitk.Image:
    """(a) 40 % of SUVmax, on the CT grid (PET interpolated linearly)."""
    return segment({"CT": images["CT"], "PET": images["PET"]}, "threshold",
                   threshold="suv_fraction", channel="PET", fraction=0.4).labels


def gmm_in_box(images: dict[str, sitk.Image]) -> sitk.Image:
    """(b) A 3-class GMM on CT, PET and MR-T1 inside a box around the PET maximum.

    The box is the 40 %-of-SUVmax region's bounding box grown by 20 mm; the tumour is the
    class with the highest PET mean, as the component holding the PET maximum, holes
    filled.
    """
    ct = images["CT"]
    pet = resample_to_reference(images["PET"], ct, name="PET")
    hot, _ = suv_fraction_threshold(pet, 0.4)
    box = crop_to_mask(ct, hot, margin_mm=GMM_BOX_MARGIN_MM)
    region = resample_to_reference(sitk.Cast(box * 0 + 1, sitk.sitkUInt8), ct, is_label=True,
                                   default_value=0)
    result = segment(images, "gmm", 3, mask=validate_mask(region), order_by="PET")
    tumour = sitk.Cast(sitk.Equal(result.labels, 3), sitk.sitkUInt8)
    values = sitk.GetArrayFromImage(pet)
    values[sitk.GetArrayViewFromImage(region) == 0] = -np.inf
    peak = np.unravel_index(int(np.argmax(values)), values.shape)[::-1]
    tumour = component_at(tumour, peak)
    return clean_labels(tumour, fill=True)


def run_prepare(args) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    table = manifest_from_folder(args.data, relative_to=args.work)
    table.to_csv(args.work / "sts_cases.csv", index=False)
    print(f"manifest: {args.work / 'sts_cases.csv'} ({len(table)} cases)")


def run_baselines(args) -> None:
    out = args.work / "baselines.json"
    results = {}
    for case_id in sorted(p.name for p in args.data.iterdir() if p.is_dir()):
        case = load_case(args.data / case_id, MODALITIES)
        images = {m: case.image(m) for m in MODALITIES}
        truth = case.mask(LABEL)
        row = {}
        for name, method in (("pet40", pet_threshold), ("gmm", gmm_in_box)):
            start = time.perf_counter()
            labels = method(images)
            row[name] = {**scores(labels, truth), "seconds": time.perf_counter() - start}
        results[case_id] = row
        print(case_id, {k: round(v["dice"], 3) for k, v in row.items()}, flush=True)
    out.write_text(json.dumps(results, indent=2))


def run_fold(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    case_ids = sorted(p.name for p in args.data.iterdir() if p.is_dir())
    test_ids = folds(case_ids)[args.fold]
    train_ids = [c for c in case_ids if c not in test_ids]
    fold_dir = args.work / f"fold{args.fold}"
    model_path = fold_dir / "model"
    if not args.skip_training:
        result = train_segmentation(
            args.work / "sts_cases.csv", MODALITIES, LABEL, model_path, cases=train_ids,
            validation_cases=test_ids, validate_every=args.validate_every, keep_best=False,
            patience=None, device="cpu", cache_dir=args.work / "cases", **RECIPE,
        )
        (fold_dir / "training.json").write_text(json.dumps(
            {"runtime_s": result.runtime_s, "history": result.history, "threads": args.threads},
            indent=2))
    evaluation = {}
    for case_id in test_ids:
        case = load_case(args.data / case_id, MODALITIES)
        images = {m: case.image(m) for m in MODALITIES}
        start = time.perf_counter()
        labels = segment(images, "model", model=model_path, device="cpu").labels
        seconds = time.perf_counter() - start
        evaluation[case_id] = {**scores(labels, case.mask(LABEL)), "seconds": seconds}
        print(case_id, evaluation[case_id], flush=True)
    (fold_dir / "evaluation.json").write_text(json.dumps(evaluation, indent=2))


def run_report(args) -> None:
    case_ids = sorted(p.name for p in args.data.iterdir() if p.is_dir())
    baselines = json.loads((args.work / "baselines.json").read_text())
    lines = [
        "| fold | patients | PET 40 % Dice | GMM Dice | model Dice | PET 40 % HD95 | GMM HD95 "
        "| model HD95 | training (min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    every = {"pet40": [], "gmm": [], "model": []}
    times, trainings = [], []
    for k, test_ids in enumerate(folds(case_ids)):
        fold_dir = args.work / f"fold{k}"
        if not (fold_dir / "evaluation.json").is_file():
            lines.append(f"| {k} | {', '.join(test_ids)} | (not run) |||||||")
            continue
        model = json.loads((fold_dir / "evaluation.json").read_text())
        training = json.loads((fold_dir / "training.json").read_text())
        trainings.append(training["runtime_s"] / 60)
        cells = {}
        for name in every:
            rows = [model[c] if name == "model" else baselines[c][name] for c in test_ids]
            every[name] += rows
            cells[name] = (np.mean([r["dice"] for r in rows]),
                           np.nanmean([r["hd95_mm"] for r in rows]))
        times += [model[c]["seconds"] for c in test_ids]
        lines.append(
            f"| {k} | {', '.join(c.replace('STS_', '') for c in test_ids)} | "
            + " | ".join(f"{cells[n][0]:.3f}" for n in every) + " | "
            + " | ".join(f"{cells[n][1]:.1f}" for n in every)
            + f" | {trainings[-1]:.1f} |"
        )
    if times:
        lines.append(
            "| **all** | " + str(len(times)) + " | "
            + " | ".join(f"**{np.mean([r['dice'] for r in every[n]]):.3f}** +- "
                         f"{np.std([r['dice'] for r in every[n]]):.3f}" for n in every) + " | "
            + " | ".join(f"{np.nanmean([r['hd95_mm'] for r in every[n]]):.1f}" for n in every)
            + f" | {np.mean(trainings):.1f} |"
        )
        lines.append("")
        lines.append(f"Model inference per case (CPU, presets + TTA): median "
                     f"{np.median(times):.1f} s, max {np.max(times):.1f} s.")
    per_case = ["", "| patient | PET 40 % | GMM | model |", "|---|---|---|---|"]
    for k, test_ids in enumerate(folds(case_ids)):
        path = args.work / f"fold{k}" / "evaluation.json"
        model = json.loads(path.read_text()) if path.is_file() else {}
        for c in test_ids:
            m = f"{model[c]['dice']:.3f}" if c in model else "-"
            per_case.append(f"| {c} (fold {k}) | {baselines[c]['pet40']['dice']:.3f} | "
                            f"{baselines[c]['gmm']['dice']:.3f} | {m} |")
    header = (f"Machine: {platform.node()}, {os.cpu_count()} CPU cores, no GPU; "
              f"{datetime.date.today().isoformat()}.")
    text = "\n".join([header, "", *lines, *per_case])
    (args.work / "report.md").write_text(text + "\n")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = development_data_dir()
    parser.add_argument("--data", type=Path, default=data / "sts" if data else None)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/.cache/segmentation"))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("MMA_THREADS", 2)))
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("prepare")
    sub.add_parser("baselines")
    fold = sub.add_parser("fold")
    fold.add_argument("fold", type=int, choices=range(FOLDS))
    fold.add_argument("--validate-every", type=int, default=5)
    fold.add_argument("--skip-training", action="store_true")
    sub.add_parser("report")
    args = parser.parse_args()
    if args.data is None or not args.data.is_dir():
        raise SystemExit("the STS data was not found: set MMA_DATA or pass --data")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    {"prepare": run_prepare, "baselines": run_baselines, "fold": run_fold,
     "report": run_report}[args.step](args)


if __name__ == "__main__":
    main()
