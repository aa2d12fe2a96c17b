"""Registration benchmark on the 20 STS patients: MultiModalAnalysis vs elastix vs ANTs.

CT is fixed; PET and MR-T1 are moved by known random transforms (rigid: +-10 deg, +-15 mm
per axis; affine: plus +-8 % scale and shear up to 0.04; deformable: the affine plus a
smooth displacement of up to 6 mm), registered back by every method, and measured:
target registration error over 300 points (100 in the tumour, 100 in a 15 mm shell around
it, 100 elsewhere in the body), tumour-mask Dice after warping, wall and CPU time per pair,
peak memory, folding (deformable). Every method also registers the unperturbed pair (drift
from the dataset alignment), and consistency is the distance between the transform found
from the perturbed start and the one found from the unperturbed start composed with the
known perturbation.

Run (peers need the ``bench`` extra: ``pip install -e ".[bench]"``), always under the
shared CPU lock; results are cached per job, so runs resume and can be split:

    flock /tmp/mma-cpu.lock .venv/bin/python benchmarks/registration.py run --cases 1-5
    .venv/bin/python benchmarks/registration.py report       # Markdown tables
    flock /tmp/mma-cpu.lock .venv/bin/python benchmarks/registration.py size256

Options of ``run``: --cases (e.g. 1-20 or 2,5), --modalities, --kinds, --methods, --starts,
--results-dir, --force (redo cached jobs), --perturbation (``resample``, the default: the
perturbed moving image is resampled on its own grid; ``header``, rigid only: its frame is
moved instead, so its voxels are untouched and consistency measures the method alone).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from MultiModalAnalysisLib.metrics import dice, folding_statistics, jacobian_determinant  # noqa: E402
from MultiModalAnalysisLib.registration import register  # noqa: E402
from MultiModalAnalysisLib.registration.perturb import (  # noqa: E402
    inverse_map_points,
    move_image_rigidly,
    padded_grid,
    perturb_image,
    random_affine,
    random_rigid,
    random_smooth_displacement,
)
from MultiModalAnalysisLib.registration.prepare import image_centre  # noqa: E402
from MultiModalAnalysisLib.registration.transforms import compose  # noqa: E402
from MultiModalAnalysisLib.sample_data import development_data_dir  # noqa: E402

KINDS = ("rigid", "affine", "deformable")
MODALITIES = ("PET", "MR_T1")
METHODS = ("mma", "mma-bspline", "elastix", "ants")
STARTS = ("perturbed", "unperturbed")
PERTURBATIONS = ("resample", "header")
POINTS_PER_GROUP = 100
SHELL_MM = 15.0
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "registration"
sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)


# ---------------------------------------------------------------- data and ground truth

def case_dir(number: int) -> Path:
    data = development_data_dir()
    if data is None:
        raise SystemExit("development data not found: set MMA_DATA or provide ../shared/data")
    return data / "sts" / f"STS_{number:03d}"


def parse_cases(text: str) -> list[int]:
    cases: list[int] = []
    for part in text.split(","):
        if "-" in part:
            low, high = part.split("-")
            cases += range(int(low), int(high) + 1)
        elif part:
            cases.append(int(part.replace("STS_", "")))
    return cases


def perturbation(case: int, modality: str, kind: str, moving: sitk.Image) -> sitk.Transform:
    """The known random perturbation of one pair (seeded by case, modality and kind)."""
    seed = 1000 * case + 10 * MODALITIES.index(modality) + KINDS.index(kind)
    rng = np.random.default_rng(seed)
    centre = image_centre(moving)
    if kind == "rigid":
        return random_rigid(rng, 10.0, 15.0, centre)
    affine = random_affine(rng, 10.0, 15.0, max_scale=0.08, max_shear=0.04, centre=centre)
    if kind == "affine":
        return affine
    return compose(affine, random_smooth_displacement(rng, moving, 6.0, smoothness_mm=25.0))


def sample_points(ct: sitk.Image, tumour: sitk.Image, moving: sitk.Image, case: int,
                  modality: str) -> dict[str, np.ndarray]:
    """100 points in the tumour, 100 in a 15 mm shell around it, 100 elsewhere in the body
    (CT > -300 HU), all inside the moving image's field of view (3 mm margin)."""
    rng = np.random.default_rng(7 * case + MODALITIES.index(modality))
    ct_array = sitk.GetArrayFromImage(ct)
    tumour_array = sitk.GetArrayFromImage(tumour) > 0
    distance = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        sitk.Cast(tumour > 0, sitk.sitkUInt8), insideIsPositive=False, useImageSpacing=True))
    groups = {
        "tumour": tumour_array,
        "shell": (distance > 0) & (distance <= SHELL_MM) & (ct_array > -300),
        "body": (distance > SHELL_MM) & (ct_array > -300),
    }
    direction = np.array(ct.GetDirection()).reshape(3, 3)
    lo, hi = _bounds(moving)
    points = {}
    for name, region in groups.items():
        index = np.argwhere(region)[:, ::-1]
        physical = np.array(ct.GetOrigin()) + (index * np.array(ct.GetSpacing())) @ direction.T
        inside = np.all((physical > lo + 3.0) & (physical < hi - 3.0), axis=1)
        physical = physical[inside]
        if len(physical) > POINTS_PER_GROUP:
            physical = physical[rng.choice(len(physical), POINTS_PER_GROUP, replace=False)]
        points[name] = physical
    return points


def _bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    from MultiModalAnalysisLib.images import physical_bounds

    return physical_bounds(image)


# ---------------------------------------------------------------- the methods

# Each method is (load, register): ``load`` reads its inputs (not timed), ``register`` is
# the timed call and returns something ``as_transform`` turns into a SimpleITK transform.

def load_sitk(paths):
    return paths["fixed_image"], paths["moving_image"]


def run_mma(inputs, kind, modality):
    fixed, moving = inputs
    return register(fixed, moving, kind, fixed_modality="CT", moving_modality=modality,
                    device="cpu").transform


def run_mma_bspline(inputs, kind, modality):
    fixed, moving = inputs
    return register(fixed, moving, kind, fixed_modality="CT", moving_modality=modality,
                    backend="bspline").transform


def load_itk(paths):
    import itk

    return itk.imread(str(paths["fixed"]), itk.F), itk.imread(str(paths["moving"]), itk.F)


def run_elastix(inputs, kind, modality):
    """elastix defaults: rigid (geometric-centre start); affine = rigid then affine;
    deformable = rigid, affine, then B-spline (10 mm final grid, bending penalty), all with
    Mattes MI, 4 resolutions, 256 iterations, 2048 random samples per iteration."""
    import itk

    fixed_itk, moving_itk = inputs
    parameters = itk.ParameterObject.New()
    stages = {"rigid": ["rigid"], "affine": ["rigid", "affine"],
              "deformable": ["rigid", "affine", "bspline"]}[kind]
    for stage in stages:
        stage_map = parameters.GetDefaultParameterMap(stage)
        stage_map["WriteResultImage"] = ["false"]
        if stage == "rigid":
            stage_map["AutomaticTransformInitialization"] = ["true"]
        parameters.AddParameterMap(stage_map)
    _, result = itk.elastix_registration_method(
        fixed_itk, moving_itk, parameter_object=parameters, log_to_console=False,
        number_of_threads=2)
    return ("elastix", result, moving_itk)


def elastix_transform(result, moving_itk) -> sitk.Transform:
    """elastix's transform as a displacement field on the fixed grid (transformix)."""
    import itk

    field = itk.transformix_deformation_field(moving_itk, result)
    image = sitk.GetImageFromArray(itk.array_from_image(field).astype(np.float64),
                                   isVector=True)
    image.SetOrigin(tuple(field.GetOrigin()))
    image.SetSpacing(tuple(field.GetSpacing()))
    image.SetDirection(tuple(itk.array_from_matrix(field.GetDirection()).ravel()))
    return sitk.DisplacementFieldTransform(image)


def load_ants(paths):
    import ants

    return (ants.image_read(str(paths["fixed"])), ants.image_read(str(paths["moving"])),
            paths["tmp"])


def run_ants(inputs, kind, modality):
    """ANTsPy defaults: 'Rigid', 'Affine' (Mattes MI, 4 levels, centre-of-mass start) and
    'SyN' (affine then symmetric normalisation with Mattes MI)."""
    import ants

    fixed_ants, moving_ants, tmp = inputs
    type_of_transform = {"rigid": "Rigid", "affine": "Affine", "deformable": "SyN"}[kind]
    result = ants.registration(fixed_ants, moving_ants, type_of_transform=type_of_transform,
                               outprefix=str(tmp / "ants_"))
    return ("ants", result["fwdtransforms"])


def ants_transform(files: list[str]) -> sitk.Transform:
    """ANTs forward transforms [warp, affine] as one fixed -> moving SimpleITK transform
    (the affine is applied to points after the warp; checked against ants.apply_transforms)."""
    transforms = []
    for name in files:
        if name.endswith(".mat"):
            transforms.append(sitk.ReadTransform(name))
        else:
            transforms.append(sitk.DisplacementFieldTransform(
                sitk.ReadImage(name, sitk.sitkVectorFloat64)))
    return compose(*reversed(transforms))


RUNNERS = {"mma": (load_sitk, run_mma), "mma-bspline": (load_sitk, run_mma_bspline),
           "elastix": (load_itk, run_elastix), "ants": (load_ants, run_ants)}


def warm_up(methods: list[str]) -> None:
    """Import each method's libraries once, so no timing includes a first-call import.

    For this project's torch backend that is MONAI (about 2.7 s to import) and torch's
    optimiser machinery (the first ``torch.optim.Adam`` imports ``torch._dynamo``, about
    1.5 s): both load lazily inside the first deformable registration of a process.
    """
    if "mma" in methods:
        from MultiModalAnalysisLib.registration.deformable_torch import warm_up as warm_torch

        warm_torch()

    if "elastix" in methods:
        import itk

        itk.ElastixRegistrationMethod  # noqa: B018  (itk loads modules lazily)
        itk.ParameterObject.New()
    if "ants" in methods:
        import ants  # noqa: F401


def as_transform(raw) -> sitk.Transform:
    if isinstance(raw, tuple) and raw[0] == "elastix":
        return elastix_transform(raw[1], raw[2])
    if isinstance(raw, tuple) and raw[0] == "ants":
        return ants_transform(raw[1])
    return raw


# ---------------------------------------------------------------- measuring one job

def _peak_reset() -> int:
    with contextlib.suppress(OSError):  # resets the peak-RSS counter (Linux)
        Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"{key}:\s+(\d+)", text)
    return int(match.group(1)) if match else 0


def map_points(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    return np.array([transform.TransformPoint(tuple(map(float, p))) for p in points])


def apply_perturbation(image: sitk.Image, perturbation: sitk.Transform, how: str, *,
                       is_label: bool = False) -> sitk.Image:
    """``M'(y) = M(P(y))``, either resampled on the image's own grid (``resample``: content
    moved out is lost and values are interpolated) or, for a rigid ``P``, by moving the
    image's frame (``header``: the voxels are untouched, so the perturbed image is exactly
    the original, moved)."""
    if how == "header":
        return move_image_rigidly(image, perturbation)
    return perturb_image(image, perturbation, is_label=is_label)


def run_job(case: int, modality: str, kind: str, start: str, method: str,
            results: Path, how: str = "resample") -> dict:
    directory = case_dir(case)
    ct = sitk.ReadImage(str(directory / "CT_image.nii.gz"))
    tumour = sitk.ReadImage(str(directory / "CT_mask.nii.gz"))
    moving = sitk.ReadImage(str(directory / f"{modality}_image.nii.gz"))
    moving_mask = sitk.ReadImage(str(directory / f"{modality}_mask.nii.gz"))
    groups = sample_points(ct, tumour, moving, case, modality)
    points = np.concatenate(list(groups.values()))
    if start == "perturbed":
        truth_transform = perturbation(case, modality, kind, moving)
        moving = apply_perturbation(moving, truth_transform, how)
        moving_mask = apply_perturbation(moving_mask, truth_transform, how, is_label=True)
        truth = inverse_map_points(truth_transform, points)
        perturbation_file = results / f"STS_{case:03d}" / f"{modality}_{kind}_perturbation.h5"
        perturbation_file.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteTransform(truth_transform, str(perturbation_file))
    else:
        truth = points.copy()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fixed": Path(tmp) / "fixed.nii.gz", "moving": Path(tmp) / "moving.nii.gz",
                 "tmp": Path(tmp), "fixed_image": ct, "moving_image": moving}
        sitk.WriteImage(sitk.Cast(ct, sitk.sitkFloat32), str(paths["fixed"]))
        sitk.WriteImage(sitk.Cast(moving, sitk.sitkFloat32), str(paths["moving"]))
        load, method_run = RUNNERS[method]
        inputs = load(paths)
        baseline = _peak_reset()
        wall, cpu = time.perf_counter(), time.process_time()
        raw = method_run(inputs, kind, modality)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak_mb = max(0, _status_kb("VmHWM") - baseline) / 1024
        with contextlib.chdir(tmp):  # transformix writes deformationField.nii to the cwd
            transform = as_transform(raw)
    mapped = map_points(transform, points)
    errors = np.linalg.norm(mapped - truth, axis=1)
    warped_mask = sitk.Resample(moving_mask, ct, transform, sitk.sitkNearestNeighbor, 0,
                                moving_mask.GetPixelID())
    start_mask = sitk.Resample(moving_mask, ct, sitk.Transform(3, sitk.sitkIdentity),
                               sitk.sitkNearestNeighbor, 0, moving_mask.GetPixelID())
    record = {
        "case": case, "modality": modality, "kind": kind, "start": start, "method": method,
        "perturbation": how if start == "perturbed" else None,
        "wall_s": wall, "cpu_s": cpu, "peak_extra_mb": peak_mb,
        "tre_median": float(np.median(errors)), "tre_p95": float(np.percentile(errors, 95)),
        "tre_groups": {}, "start_error_median": float(np.median(
            np.linalg.norm(points - truth, axis=1))),
        "dice": dice(warped_mask, tumour), "dice_start": dice(start_mask, tumour),
        "points": points.tolist(), "mapped": mapped.tolist(), "errors": errors.tolist(),
    }
    offset = 0
    for name, group in groups.items():
        record["tre_groups"][name] = float(np.median(errors[offset:offset + len(group)]))
        offset += len(group)
    if kind == "deformable":
        grid = padded_grid(ct, 2.0)
        stats = folding_statistics(jacobian_determinant(transform, grid))
        record.update(stats)
    return record


def job_path(results: Path, case: int, modality: str, kind: str, start: str,
             method: str) -> Path:
    return results / f"STS_{case:03d}" / f"{modality}_{kind}_{start}_{method}.json"


def _job_in_child(connection, *job) -> None:
    try:
        record = run_job(*job)
    except Exception as error:  # a peer raising is a result too
        traceback.print_exc()
        record = {"failed": f"{type(error).__name__}: {error}"}
    connection.send(record)
    connection.close()


def run_isolated(case: int, modality: str, kind: str, start: str, method: str,
                 results: Path, how: str = "resample") -> dict:
    """``run_job`` in a forked child process, so a peer that crashes the interpreter
    (itk-elastix 0.25.4 segfaults on some deformable pairs) is recorded as a failure instead
    of ending the run. The child inherits the warmed-up imports; its timings and peak memory
    are its own."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_job_in_child,
                            args=(send, case, modality, kind, start, method, results, how))
    child.start()
    send.close()
    try:
        record = receive.recv() if receive.poll(3600) else None
    except EOFError:  # the child died before sending anything
        record = None
    child.join()
    if record is None:
        record = {"failed": f"crashed (exit code {child.exitcode})"}
    if "failed" in record:
        record.update({"case": case, "modality": modality, "kind": kind, "start": start,
                       "method": method,
                       "perturbation": how if start == "perturbed" else None})
    return record


def is_cached(path: Path, start: str, how: str) -> bool:
    """Whether the job's record is already at ``path``; a perturbed job recorded with the
    other perturbation (records from before the option count as ``resample``) stops the
    run rather than mixing the two in one results folder."""
    if not path.exists():
        return False
    recorded = json.loads(path.read_text()).get("perturbation") or "resample"
    if start == "perturbed" and recorded != how:
        raise SystemExit(f"{path} was perturbed by {recorded}, not {how}: use another "
                         "--results-dir (or --force to replace it).")
    return True


def command_run(args: argparse.Namespace) -> None:
    results = Path(args.results_dir)
    if args.perturbation == "header" and set(args.kinds.split(",")) - {"rigid"}:
        raise SystemExit("--perturbation header moves the image's frame, which only a rigid "
                         "perturbation can do: use it with --kinds rigid.")
    warm_up(args.methods.split(","))
    for case in parse_cases(args.cases):
        for modality in args.modalities.split(","):
            for kind in args.kinds.split(","):
                for start in args.starts.split(","):
                    for method in args.methods.split(","):
                        if method == "mma-bspline" and kind != "deformable":
                            continue
                        path = job_path(results, case, modality, kind, start, method)
                        if not args.force and is_cached(path, start, args.perturbation):
                            continue
                        label = f"STS_{case:03d} {modality} {kind} {start} {method}"
                        record = run_isolated(case, modality, kind, start, method, results,
                                              args.perturbation)
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_text(json.dumps(record))
                        summary = (f"TRE {record['tre_median']:.2f} mm, "
                                   f"{record['wall_s']:.1f} s" if "failed" not in record
                                   else record["failed"])
                        print(f"{label}: {summary}", flush=True)


# ---------------------------------------------------------------- the report

def load_results(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("STS_*/*.json"))]


def consistency(record: dict, unperturbed: dict, results: Path) -> float:
    """Median distance between the perturbed-start result and P^-1 o (unperturbed result)."""
    path = results / f"STS_{record['case']:03d}" / (
        f"{record['modality']}_{record['kind']}_perturbation.h5")
    known = sitk.ReadTransform(str(path))
    expected = inverse_map_points(known, np.array(unperturbed["mapped"]))
    return float(np.median(np.linalg.norm(np.array(record["mapped"]) - expected, axis=1)))


def command_report(args: argparse.Namespace) -> None:
    results = Path(args.results_dir)
    records = load_results(results)
    index = {(r["case"], r["modality"], r["kind"], r["start"], r["method"]): r for r in records}
    applied = sorted({r.get("perturbation") or "resample" for r in records
                      if r.get("start") == "perturbed" and "failed" not in r})
    lines = [f"Results: {len(records)} jobs in {results}; perturbation applied by: "
             f"{', '.join(applied) or 'none'}."]
    header = ("| kind | moving | method | pairs | TRE median (mm) | TRE p95 (mm) | "
              "TRE < 2 mm | drift (mm) | consistency (mm) | Dice | wall s | CPU s | "
              "peak MB | folding % |")
    lines += ["", header, "|---" * (header.count("|") - 1) + "|"]
    summary: dict[tuple, dict] = {}
    for kind in KINDS:
        for modality in MODALITIES:
            for method in METHODS:
                rows = [r for r in records if r["kind"] == kind and r["modality"] == modality
                        and r["method"] == method and r["start"] == "perturbed"]
                if not rows:
                    continue
                ok = [r for r in rows if "failed" not in r]
                failed = len(rows) - len(ok)
                drift, cons = [], []
                for r in ok:
                    base = index.get((r["case"], modality, kind, "unperturbed", method))
                    if base and "failed" not in base:
                        drift.append(base["tre_median"])
                        cons.append(consistency(r, base, results))
                tre = [r["tre_median"] for r in ok] + [np.inf] * failed
                pooled = np.concatenate([r["errors"] for r in ok]) if ok else np.array([np.nan])
                entry = {
                    "pairs": len(rows), "tre": float(np.median(tre)),
                    "p95": float(np.percentile(pooled, 95)),
                    "robust": float(np.mean(np.array(tre) < 2.0) * 100),
                    "drift": float(np.median(drift)) if drift else np.nan,
                    "consistency": float(np.median(cons)) if cons else np.nan,
                    "consistent_2mm": float(np.mean(np.array(cons) < 2.0) * 100) if cons
                    else np.nan,
                    "dice": float(np.median([r["dice"] for r in ok])) if ok else np.nan,
                    "wall": float(np.median([r["wall_s"] for r in ok])) if ok else np.nan,
                    "cpu": float(np.median([r["cpu_s"] for r in ok])) if ok else np.nan,
                    "peak": float(np.median([r["peak_extra_mb"] for r in ok])) if ok
                    else np.nan,
                    "folding": float(np.median([r.get("folding_percent", np.nan)
                                                for r in ok])) if ok else np.nan,
                    "failed": failed,
                }
                summary[(kind, modality, method)] = entry
                lines.append(
                    f"| {kind} | {modality} | {method} | {entry['pairs']}"
                    f"{f' ({failed} failed)' if failed else ''} | {entry['tre']:.2f} | "
                    f"{entry['p95']:.2f} | {entry['robust']:.0f} % | {entry['drift']:.2f} | "
                    f"{entry['consistency']:.2f} | {entry['dice']:.3f} | {entry['wall']:.1f} | "
                    f"{entry['cpu']:.1f} | {entry['peak']:.0f} | {_optional(entry['folding'])} |")
    lines += ["", "Ratios (MultiModalAnalysis / peer, medians over pairs):", "",
              "| kind | moving | peer | TRE ratio | consistency ratio | wall-time ratio | "
              "CPU-time ratio |", "|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        for modality in MODALITIES:
            ours = summary.get((kind, modality, "mma"))
            for peer in ("elastix", "ants"):
                theirs = summary.get((kind, modality, peer))
                if ours and theirs:
                    lines.append(
                        f"| {kind} | {modality} | {peer} | {ours['tre'] / theirs['tre']:.2f} | "
                        f"{ours['consistency'] / theirs['consistency']:.2f} | "
                        f"{ours['wall'] / theirs['wall']:.2f} | "
                        f"{ours['cpu'] / theirs['cpu']:.2f} |")
    groups = ["", "TRE by region (MultiModalAnalysis, perturbed starts, median of per-pair "
              "medians, mm):", "", "| kind | moving | tumour | 15 mm shell | body |",
              "|---|---|---|---|---|"]
    for kind in KINDS:
        for modality in MODALITIES:
            ok = [r for r in records if r["kind"] == kind and r["modality"] == modality
                  and r["method"] == "mma" and r["start"] == "perturbed" and "failed" not in r]
            if ok:
                values = [np.median([r["tre_groups"][g] for r in ok])
                          for g in ("tumour", "shell", "body")]
                groups.append(f"| {kind} | {modality} | " + " | ".join(f"{v:.2f}"
                                                                       for v in values) + " |")
    lines += groups
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} "
              f"cores; report written {datetime.date.today()}."]
    text = "\n".join(lines)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({" / ".join(k): v for k, v in summary.items()},
                                              indent=1, default=float))


def _optional(value: float) -> str:
    return "" if np.isnan(value) else f"{value:.3f}"


def command_size256(args: argparse.Namespace) -> None:
    """Time the torch deformable backend on a 256^3 pair (CPU here; the GPU target)."""
    import torch

    from MultiModalAnalysisLib.device import describe_device
    from MultiModalAnalysisLib.registration.deformable_torch import register_deformable_torch
    from MultiModalAnalysisLib.registration.prepare import registration_image

    data = development_data_dir()
    t1 = sitk.ReadImage(str(data / "brats_gli_00001" / "BraTS-GLI-00001-000-t1n.nii.gz"))
    t2 = sitk.ReadImage(str(data / "brats_gli_00001" / "BraTS-GLI-00001-000-t2w.nii.gz"))
    spacing = [240 / 256, 240 / 256, 155 / 256]
    volumes = [sitk.Resample(image, [256] * 3, sitk.Transform(), sitk.sitkLinear,
                             image.GetOrigin(), spacing, image.GetDirection())
               for image in (t1, t2)]
    rng = np.random.default_rng(0)
    warp = random_smooth_displacement(rng, volumes[1], 5.0)
    moving = perturb_image(volumes[1], warp)
    fixed = registration_image(volumes[0], "T1")
    moving = registration_image(moving, "T2")
    device = torch.device(args.device)
    warm_up(["mma"])  # monai and torch's optimiser machinery load on first use
    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu = time.perf_counter(), time.process_time()
        register_deformable_torch(fixed, moving, sitk.Euler3DTransform(), "mi", device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    print(f"torch deformable stage, 256^3 T1/T2 pair, {describe_device(device)}: "
          f"median {np.median(times):.2f} s wall, {np.median(cpu_times):.2f} s CPU over "
          f"{len(times)} runs ({', '.join(f'{t:.2f}' for t in times)} s), after a warm-up "
          f"(torch: one intra-op thread in the stage on the CPU; ITK: "
          f"{sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()} threads)")



def command_lesion_mask(args: argparse.Namespace) -> None:
    """Rigid registration with the tumour (GTV) as the fixed mask against none: the same
    known perturbation for every patient (6 degrees about z around the tumour's centre,
    then (6, -5, 4) mm), TRE over up to 300 tumour voxels (the moving image is resampled
    through the perturbation, so PET's truth is the scanner's alignment)."""
    import warnings

    rows = []
    margins = [None if m == "auto" else float(m) for m in args.margins.split(",")]
    for case in parse_cases(args.cases):
        folder = case_dir(case)
        ct = sitk.ReadImage(str(folder / "CT_image.nii.gz"))
        tumour = sitk.ReadImage(str(folder / "CT_mask.nii.gz"))
        index = np.argwhere(sitk.GetArrayViewFromImage(tumour) > 0)[:, ::-1].astype(float)
        index = index[::max(1, len(index) // 300)]
        points = np.array([tumour.TransformContinuousIndexToPhysicalPoint(p.tolist())
                           for p in index])
        motion = sitk.Euler3DTransform()
        motion.SetCenter(points.mean(axis=0).tolist())
        motion.SetRotation(0.0, 0.0, math.radians(6.0))
        motion.SetTranslation((6.0, -5.0, 4.0))
        truth = map_points(motion.GetInverse(), points)
        for modality in args.modalities.split(","):
            original = sitk.ReadImage(str(folder / f"{modality}_image.nii.gz"))
            moving = sitk.Resample(original, original, motion, sitk.sitkLinear,
                                   float(sitk.GetArrayViewFromImage(original).min()))
            for margin in [False, *margins]:
                options = ({} if margin is False else {"fixed_mask": tumour} if margin is None
                           else {"fixed_mask": tumour, "mask_margin_mm": margin})
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = register(ct, moving, "rigid", fixed_modality="CT",
                                      moving_modality=modality, threads=1, **options)
                tre = np.linalg.norm(map_points(result.transform, points) - truth, axis=1)
                label = ("no mask" if margin is False else
                         f"GTV, margin {'auto' if margin is None else margin}")
                rows.append((case, modality, label, float(np.median(tre)),
                             time.perf_counter() - start, bool(result.warnings)))
                print(f"STS_{case:03d} {modality} {label}: tumour TRE median "
                      f"{rows[-1][3]:.2f} mm, {rows[-1][4]:.1f} s"
                      + (" (warned)" if rows[-1][5] else ""), flush=True)
    print()
    for label in dict.fromkeys(r[2] for r in rows):
        values = [r[3] for r in rows if r[2] == label]
        print(f"| {label} | {len(values)} | {np.median(values):.2f} | {np.mean(values):.2f} | "
              f"{sum(v > 10 for v in values)} | {max(values):.1f} | "
              f"{sum(r[5] for r in rows if r[2] == label)} |")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) benchmark jobs")
    run.add_argument("--cases", default="1-20")
    run.add_argument("--modalities", default=",".join(MODALITIES))
    run.add_argument("--kinds", default=",".join(KINDS))
    run.add_argument("--methods", default="mma,elastix,ants,mma-bspline")
    run.add_argument("--starts", default=",".join(STARTS))
    run.add_argument("--results-dir", default=str(DEFAULT_RESULTS))
    run.add_argument("--force", action="store_true")
    run.add_argument("--perturbation", choices=PERTURBATIONS, default="resample",
                     help="how the known perturbation is applied to the moving image: "
                     "resampled on its own grid (default), or by moving its frame (rigid only; "
                     "exact: no interpolation, nothing moved out of the crop); use a results "
                     "folder per choice")
    run.set_defaults(func=command_run)
    report = commands.add_parser("report", help="print the Markdown tables")
    report.add_argument("--results-dir", default=str(DEFAULT_RESULTS))
    report.add_argument("--json", help="also write the summary as JSON here")
    report.set_defaults(func=command_report)
    size = commands.add_parser("size256", help="time the torch backend on a 256^3 pair")
    size.add_argument("--device", default="cpu")
    size.add_argument("--repeats", type=int, default=2)
    size.set_defaults(func=command_size256)
    lesion = commands.add_parser("lesion-mask", help="rigid registration with the GTV as "
                                 "fixed mask against none (tumour TRE)")
    lesion.add_argument("--cases", default="1-20")
    lesion.add_argument("--modalities", default="PET")
    lesion.add_argument("--margins", default="auto",
                        help="comma-separated mask margins in mm, or auto (the default rule)")
    lesion.set_defaults(func=command_lesion_mask)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
