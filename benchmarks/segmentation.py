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
    "epochs": 100,
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


def pet_threshold(images: dict[str, sitk.Image], voi: sitk.Image | None = None) -> sitk.Image:
    """(a) 40 % of SUVmax, on the CT grid (PET interpolated linearly), in the whole crop or
    in a volume of interest."""
    return segment({"CT": images["CT"], "PET": images["PET"]}, "threshold", mask=voi,
                   threshold="suv_fraction", channel="PET", fraction=0.4).labels


def seeded_voi(truth: sitk.Image) -> sitk.Image:
    """The expert GTV grown by 10 mm: a stand-in for a user's click on the lesion."""
    radius = [max(int(round(10.0 / s)), 1) for s in truth.GetSpacing()]
    return sitk.Cast(sitk.BinaryDilate(sitk.Cast(truth, sitk.sitkUInt8), radius), sitk.sitkUInt8)


def gmm_in_box(images: dict[str, sitk.Image], voi: sitk.Image | None = None) -> sitk.Image:
    """(b) A 3-class GMM on CT, PET and MR-T1 inside a box around the PET maximum.

    The box is the 40 %-of-SUVmax region's bounding box (SUVmax in the whole crop, or in
    ``voi``) grown by 20 mm; the tumour is the class with the highest PET mean, as the
    component holding that maximum, holes filled.
    """
    ct = images["CT"]
    pet = resample_to_reference(images["PET"], ct, name="PET")
    hot, _ = suv_fraction_threshold(pet, 0.4, voi)
    box = crop_to_mask(ct, hot, margin_mm=GMM_BOX_MARGIN_MM)
    region = resample_to_reference(sitk.Cast(box * 0 + 1, sitk.sitkUInt8), ct, is_label=True,
                                   default_value=0)
    result = segment(images, "gmm", 3, mask=validate_mask(region), order_by="PET")
    tumour = sitk.Cast(sitk.Equal(result.labels, 3), sitk.sitkUInt8)
    values = sitk.GetArrayFromImage(pet)
    values[sitk.GetArrayViewFromImage(hot) == 0] = -np.inf  # the maximum the box is around
    peak = np.unravel_index(int(np.argmax(values)), values.shape)[::-1]
    tumour = component_at(tumour, peak)
    return clean_labels(tumour, fill=True)


def run_prepare(args) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    table = manifest_from_folder(args.data, relative_to=args.work)
    table.to_csv(args.work / "sts_cases.csv", index=False)
    print(f"manifest: {args.work / 'sts_cases.csv'} ({len(table)} cases)")


def run_baselines(args) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / "baselines.json"
    results = {}
    for case_id in sorted(p.name for p in args.data.iterdir() if p.is_dir()):
        case = load_case(args.data / case_id, MODALITIES)
        images = {m: case.image(m) for m in MODALITIES}
        truth = case.mask(LABEL)
        row = {}
        voi = seeded_voi(truth)
        for name, method, region in (("pet40", pet_threshold, None), ("gmm", gmm_in_box, None),
                                     ("pet40_seeded", pet_threshold, voi),
                                     ("gmm_seeded", gmm_in_box, voi)):
            start = time.perf_counter()
            labels = method(images, region)
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
    if args.train_count is not None:
        if not 2 <= args.train_count <= len(train_ids):
            raise SystemExit(f"--train-count must be 2..{len(train_ids)}")
        rng = np.random.default_rng(1000 + args.fold)
        train_ids = sorted(rng.choice(train_ids, args.train_count, replace=False).tolist())
    fold_dir = args.work / f"{args.tag}fold{args.fold}"
    model_path = fold_dir / "model"
    recipe = {**RECIPE, **{k: json.loads(v) for k, v in (o.split("=", 1) for o in args.set)}}
    if not args.skip_training:
        result = train_segmentation(
            args.work / "sts_cases.csv", MODALITIES, LABEL, model_path, cases=train_ids,
            validation_cases=test_ids, validate_every=args.validate_every, keep_best=False,
            patience=None, device=args.device, cache_dir=args.work / "cases", **recipe,
        )
        training = result.model.metadata["training"]
        (fold_dir / "training.json").write_text(json.dumps(
            {"runtime_s": result.runtime_s, "history": result.history, "threads": args.threads,
             "device": training["device"], "precision": training["precision"]}, indent=2))
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


METHODS = {
    "pet40": "PET 40 %",
    "gmm": "GMM in box",
    "pet40_seeded": "PET 40 %, seeded",
    "gmm_seeded": "GMM, seeded",
    "model": "**model**",
}


def _fold_rows(args, case_ids, baselines):
    """Per fold: (test ids, {method: [per-case result]}, training minutes, inference s)."""
    for k, test_ids in enumerate(folds(case_ids)):
        fold_dir = args.work / f"fold{k}"
        if not (fold_dir / "evaluation.json").is_file():
            yield k, test_ids, None, None, None
            continue
        model = json.loads((fold_dir / "evaluation.json").read_text())
        training = json.loads((fold_dir / "training.json").read_text())
        rows = {n: [model[c] if n == "model" else baselines[c][n] for c in test_ids]
                for n in METHODS}
        yield (k, test_ids, rows, training["runtime_s"] / 60,
               [model[c]["seconds"] for c in test_ids])


def _table(title, key, fmt, folds_done, every):
    head = f"| fold | patients | {' | '.join(METHODS.values())} |"
    lines = [f"{title}", "", head, "|---|---|" + "---|" * len(METHODS)]
    for k, test_ids, rows, _, _ in folds_done:
        patients = ", ".join(c.replace("STS_", "") for c in test_ids)
        if rows is None:
            lines.append(f"| {k} | {patients} |" + " (not run) |" * len(METHODS))
            continue
        cells = [fmt.format(np.nanmean([r[key] for r in rows[n]])) for n in METHODS]
        lines.append(f"| {k} | {patients} | " + " | ".join(cells) + " |")
    if every["model"]:
        cells = [f"**{fmt.format(np.nanmean([r[key] for r in every[n]]))}** +- "
                 + fmt.format(np.nanstd([r[key] for r in every[n]])) for n in METHODS]
        lines.append(f"| all | {len(every['model'])} | " + " | ".join(cells) + " |")
    return lines


def run_report(args) -> None:
    case_ids = sorted(p.name for p in args.data.iterdir() if p.is_dir())
    baselines = json.loads((args.work / "baselines.json").read_text())
    done = list(_fold_rows(args, case_ids, baselines))
    every = {n: [r for _, _, rows, _, _ in done if rows for r in rows[n]] for n in METHODS}
    trainings = [t for *_, t, _ in done if t is not None]
    times = [s for *_, seconds in done if seconds for s in seconds]
    lines = _table("Dice (mean over the fold's patients)", "dice", "{:.3f}", done, every)
    lines += [""] + _table("HD95 in mm (mean)", "hd95_mm", "{:.1f}", done, every)
    if times:
        lines += ["", f"Model training per fold: {', '.join(f'{t:.1f}' for t in trainings)} "
                  f"min; inference per case (CPU, presets + TTA + clean-up): median "
                  f"{np.median(times):.1f} s, max {np.max(times):.1f} s."]
    lines += ["", "| patient | fold | " + " | ".join(METHODS.values()) + " |",
              "|---|---|" + "---|" * len(METHODS)]
    for k, test_ids, rows, _, _ in done:
        for i, c in enumerate(test_ids):
            cells = [f"{rows[n][i]['dice']:.3f}" if rows else "-" for n in METHODS]
            lines.append(f"| {c} | {k} | " + " | ".join(cells) + " |")
    header = (f"Machine: {platform.node()}, {os.cpu_count()} CPU cores, no GPU; "
              f"{datetime.date.today().isoformat()}.")
    text = "\n".join([header, "", *lines])
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
    fold.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                      help="where to train (the test patients are always segmented on the "
                      "CPU, for the CPU inference time)")
    fold.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                      help="override a recipe setting (experiments), e.g. epochs=60")
    fold.add_argument("--tag", default="", help="prefix of the fold folder (experiments)")
    fold.add_argument("--train-count", type=int, default=None, metavar="N",
                      help="train on a seeded subset of N of the fold's training patients "
                      "(learning-curve experiments; the test patients stay the same)")
    sub.add_parser("report")
    args = parser.parse_args()
    if args.data is None or not args.data.is_dir():
        raise SystemExit("the STS data was not found: set MMA_DATA or pass --data")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    {"prepare": run_prepare, "baselines": run_baselines, "fold": run_fold,
     "report": run_report}[args.step](args)


if __name__ == "__main__":
    main()
