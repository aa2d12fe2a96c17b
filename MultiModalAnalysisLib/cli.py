"""The ``mma`` command line (see DESIGN.md for the stable contract).

Each sub-command is a pair: ``_add_<name>(subparsers)`` declares its arguments and sets
``func`` to ``_run_<name>(args) -> int``. Errors a user can cause (``MMAError``) are printed
as one line without a traceback, with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from MultiModalAnalysisLib import __version__
from MultiModalAnalysisLib.errors import MMAError, OperationCancelled

log = logging.getLogger(__name__)

# Repeated here (not imported) so that building the parser does not import scikit-learn.
CLASSIFIER_CHOICES = (
    "logistic_l2", "logistic_l1", "svm", "random_forest", "gradient_boosting", "auto",
)
SELECTION_CHOICES = ("none", "univariate", "l1", "mrmr", "correlation")
# Choices of the register and fuse commands, spelled here so that building the parser does
# not import the registration engine (and torch) for every command; a test keeps them equal
# to the engine's.
TRANSFORM_CHOICES = ("rigid", "affine", "deformable")
METRIC_CHOICES = ("auto", "mi", "ncc", "lncc", "mind")
BACKEND_CHOICES = ("auto", "torch", "bspline")
FUSION_CHOICES = ("average", "maximum", "checkerboard", "overlay", "laplacian", "wavelet")


class ProgressBar:
    """A tqdm bar driven by ``progress(fraction, message)`` callbacks."""

    def __init__(self, description: str, enabled: bool = True) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=1000,
            desc=description,
            # None: tqdm hides the bar when stderr is not a terminal (logs, CI).
            disable=None if enabled else True,
            leave=False,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}",
            file=sys.stderr,
        )

    def __call__(self, fraction: float, message: str = "") -> None:
        target = int(round(1000 * min(max(fraction, 0.0), 1.0)))
        if target > self._bar.n:
            self._bar.update(target - self._bar.n)
        if message:
            self._bar.set_postfix_str(message[:60], refresh=False)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the full pipeline on the bundled sample patient",
        description="Run the whole pipeline on the bundled sample patient (CT, PET, MR-T1): "
        "load and preprocess it, register a perturbed MR back onto the CT (the recovered "
        "error in mm), resample every modality onto the CT grid, segment the tumour with the "
        "shipped model (Dice against the expert mask), compute its IBSI features, classify "
        "the case with the shipped classifier, and write the volumes, a PNG montage and "
        "report.json.",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("mma-demo-output"),
                        help="where to write the outputs (default: ./mma-demo-output)")
    parser.add_argument("--case-dir", type=Path, default=None,
                        help="run on another case folder in the STS layout instead")
    parser.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from MultiModalAnalysisLib.demo import run_demo

    with ProgressBar("demo", enabled=not args.quiet) as bar:
        result = run_demo(args.output_dir, args.case_dir, progress=bar, log=tqdm.write)
    print(f"done in {result.total_seconds:.1f} s. Outputs:")
    for name, path in result.outputs.items():
        print(f"  {name:<22} {path}")
    return 0


def _add_preprocess(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "preprocess",
        help="apply a modality preset (and optional resampling) to one volume",
        description="CT: clip HU; PET: kept as is; MR: N4 bias correction + z-score in the "
        "body. Optionally resample onto a reference grid or to a spacing.",
    )
    parser.add_argument("image", type=Path, help="input volume (NIfTI/NRRD/MHA or DICOM folder)")
    parser.add_argument("--modality", required=True, help="CT, PET, MR_T1, MR_T2, FLAIR, ...")
    parser.add_argument("--output", "-o", type=Path, required=True, help="output volume")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--reference", type=Path, help="resample onto this image's grid")
    group.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                       help="resample to this spacing in mm")
    parser.add_argument("--mask", type=Path, help="region for MR N4 and z-score")
    parser.set_defaults(func=_run_preprocess)


def _run_preprocess(args: argparse.Namespace) -> int:
    from MultiModalAnalysisLib.errors import ConfigError
    from MultiModalAnalysisLib.images import implausible_intensities, require_non_constant
    from MultiModalAnalysisLib.io import read_image, read_mask, write_image
    from MultiModalAnalysisLib.modalities import modality_family
    from MultiModalAnalysisLib.preprocess import (
        apply_modality_preset,
        mask_on_grid,
        resample_to_reference,
        resample_to_spacing,
    )
    from MultiModalAnalysisLib.preprocess.resample import spacing_grid

    if modality_family(args.modality) == "OTHER":
        log.warning(
            "modality %r is not one the presets know (CT, PET, MR_T1, MR_T2, FLAIR, ...): the "
            "image is only converted to float32.", args.modality)
    image = read_image(args.image, modality=args.modality)
    require_non_constant(image, str(args.image))
    doubt = implausible_intensities(args.modality, image, pet_in_suv=True)  # the preset: SUV
    if doubt:
        log.warning("%s (%s): %s; the %s preset assumes those units.", args.image,
                    args.modality, doubt, modality_family(args.modality))
    if args.spacing:  # before any work: a grid that flattens the volume is no result
        size = spacing_grid(image, args.spacing).GetSize()
        collapsed = [axis for axis, (old, new) in enumerate(zip(image.GetSize(), size,
                                                                strict=True))
                     if old > 1 and new == 1]
        if collapsed:
            raise ConfigError(
                f"--spacing {' '.join(f'{v:g}' for v in args.spacing)} is coarser than the "
                f"image along axis {', '.join('xyz'[a] for a in collapsed)}: the result would "
                f"have a single voxel there (size {size}), which no later step can use. Give "
                f"the spacing in mm (the image's is "
                f"{' '.join(f'{v:.3g}' for v in image.GetSpacing())}).")
    mask = None
    if args.mask and modality_family(args.modality) != "MR":
        log.warning("--mask is used by the MR presets only (N4, z-score); ignored for %s.",
                    args.modality)
    elif args.mask:  # as segment, features and register do: the mask onto the image's grid
        mask = mask_on_grid(read_mask(args.mask), image, f"the mask {args.mask}", warn=True)
    reference = None
    if args.reference:  # read and checked before the preset's work (N4: seconds to minutes)
        from MultiModalAnalysisLib.images import require_overlap

        reference = read_image(args.reference)
        require_overlap(image, reference, str(args.image), f"the reference {args.reference}")
    with ProgressBar("preprocess", enabled=not args.quiet) as bar:
        result = apply_modality_preset(image, args.modality, mask=mask, progress=bar)
    if reference is not None:
        result = resample_to_reference(result, reference, antialias=True,
                                       name=str(args.image))
    elif args.spacing:
        result = resample_to_spacing(result, args.spacing)
    print(f"wrote {write_image(result, args.output)}")
    return 0


def _add_manifest(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "manifest",
        help="write a cohort manifest CSV from a folder of case folders",
        description="Scan FOLDER/<case>/<MODALITY>_image.nii.gz and <NAME>_mask.nii.gz and "
        "write one row per case; paths are relative to the CSV's folder.",
    )
    parser.add_argument("folder", type=Path, help="folder holding one sub-folder per case")
    parser.add_argument("--output", "-o", type=Path, required=True, help="manifest CSV")
    parser.add_argument("--outcomes", type=Path, help="CSV of outcomes (first column: case id)")
    parser.set_defaults(func=_run_manifest)


def _run_manifest(args: argparse.Namespace) -> int:
    from MultiModalAnalysisLib.case import manifest_from_folder

    args.output.parent.mkdir(parents=True, exist_ok=True)
    table = manifest_from_folder(args.folder, args.outcomes, relative_to=args.output.parent)
    table.to_csv(args.output, index=False)
    print(f"wrote {args.output}: {len(table)} cases, columns {', '.join(table.columns)}")
    return 0


def _add_features(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "features",
        help="IBSI radiomics features of images in a mask (one row per case)",
        description="Compute the IBSI-1 feature families (morphology, intensity, histogram, "
        "IVH, GLCM, GLRLM, GLSZM, GLDZM, NGTDM, NGLDM) of each image inside the mask; "
        "columns are <image>_<IBSI tag>. Either one case (--image ... --mask) or a cohort "
        "(--manifest --mask-column --modalities). A mask on another grid than an image is "
        "resampled onto it with a warning.",
    )
    single = parser.add_argument_group("one case")
    single.add_argument("--image", action="append", default=[], metavar="NAME=PATH",
                        help="an image and its name (repeat for several: CT=ct.nii.gz); a "
                        "bare path is named from its file name (CT.nii.gz, PET_image.nii.gz)")
    single.add_argument("--mask", type=Path, help="the region of interest")
    single.add_argument("--case-id", help="the case's id in the table (default: the mask's "
                        "folder name)")
    cohort = parser.add_argument_group("a cohort")
    cohort.add_argument("--manifest", type=Path, help="cohort manifest CSV (one row per case)")
    cohort.add_argument("--mask-column", help="the manifest column holding each case's mask")
    cohort.add_argument("--modalities", help="comma-separated image columns, e.g. CT,PET,MR_T1")
    cohort.add_argument("--skip-failed", action="store_true",
                        help="leave out a case that cannot be read or measured (with a "
                        "warning naming it) instead of stopping the run")
    parser.add_argument("--label", type=_whole_positive, metavar="VALUE",
                        help="with a multi-label mask: measure the voxels of this label")
    parser.add_argument("--output", "-o", type=Path, help="features CSV (required unless "
                        "--list-features)")
    parser.add_argument("--settings", type=Path,
                        help="JSON or YAML file of IBSI settings (see FeatureSettings)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--list-features", action="store_true",
                        help="print the IBSI tags these settings compute, one per line "
                        "(each image's columns are <image>_<tag>), and stop")
    parser.set_defaults(func=_run_features)


def _run_features(args: argparse.Namespace) -> int:
    import pandas as pd

    from MultiModalAnalysisLib.errors import ConfigError, UnitsError
    from MultiModalAnalysisLib.features import (
        extract_cohort_features,
        extract_features,
        load_settings,
    )
    from MultiModalAnalysisLib.images import require_non_constant, require_plausible_units
    from MultiModalAnalysisLib.io import read_image
    from MultiModalAnalysisLib.modalities import canonical_modality, modality_family

    settings = load_settings(args.settings)
    if args.list_features:
        from MultiModalAnalysisLib.features.extract import feature_tags

        print("\n".join(feature_tags(settings)))
        return 0
    if args.output is None:
        raise ConfigError("give --output, the features CSV to write.")
    if args.manifest:
        if args.image or args.mask:
            raise ConfigError("give either --manifest or --image/--mask, not both.")
        if not args.mask_column or not args.modalities:
            raise ConfigError("--manifest needs --mask-column and --modalities (e.g. CT,PET).")
        modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
        with ProgressBar("features", enabled=not args.quiet) as bar:
            table = extract_cohort_features(
                args.manifest, modalities, args.mask_column, settings, args.device, bar,
                on_error="skip" if args.skip_failed else "stop", label=args.label,
            )
        failed = table.attrs.get("failed", {})
        if failed:
            print(f"left out {len(failed)} case(s): {', '.join(failed)} (see the warnings)",
                  file=sys.stderr)
        measured = table.shape[1] - 1
        table = _with_manifest_columns(table, args.manifest)
    else:
        if not args.image or not args.mask:
            raise ConfigError(
                "give --image NAME=PATH (one or more) and --mask, or --manifest with "
                "--mask-column and --modalities."
            )
        images = {}
        for item in args.image:
            name, path = _image_argument(item)
            if name is None:
                raise ConfigError(f"--image {item!r}: the file name does not tell the "
                                  "modality; write NAME=PATH, e.g. CT=ct.nii.gz.")
            # a modality is spelled as --manifest --modalities spells it (t1 -> MR_T1), so
            # that both give the same feature columns; another name is kept as typed
            if modality_family(name) != "OTHER":
                name = canonical_modality(name)
            if name in images:
                raise ConfigError(f"two images are named {name}: give each --image its own "
                                  "name (the feature columns start with it).")
            images[name] = read_image(path, name=f"{name} ({path})", modality=name)
            # (a constant region is measurable; a constant image file is a wrong file)
            require_non_constant(images[name], name)
        try:
            require_plausible_units(images, "--image")
        except UnitsError as doubt:  # a warning here: features of any image are measurable
            log.warning("%s", doubt)
        mask = read_image(args.mask, name=f"mask {args.mask}")
        if args.label is not None:
            from MultiModalAnalysisLib.images import select_label

            mask = select_label(mask, args.label, f"mask {args.mask}")
        with ProgressBar("features", enabled=not args.quiet) as bar:
            values = extract_features(images, mask, settings, args.device, bar)
        case_id = args.case_id or args.mask.resolve().parent.name
        table = pd.DataFrame([{"case_id": case_id, **values}])
        measured = len(values)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.output, index=False)
    print(f"wrote {args.output}: {len(table)} case(s), {measured} features each")
    return 0


def _with_manifest_columns(table, manifest: Path):
    """The features ``table`` with the manifest's columns that are not image paths (the
    outcomes, clinical data) after ``case_id``, so that the table can go straight to
    ``mma train-classifier --label-column``."""
    from MultiModalAnalysisLib.case import read_manifest
    from MultiModalAnalysisLib.classification.table import image_path_columns

    cohort = read_manifest(manifest).table
    paths = set(image_path_columns(cohort))
    kept = [str(c) for c in cohort.columns
            if c != "case_id" and c not in paths and c not in table.columns]
    if not kept or table.empty:
        return table
    extra = cohort.assign(case_id=cohort["case_id"].astype(str).str.strip())[["case_id", *kept]]
    merged = table.assign(case_id=table["case_id"].astype(str)).merge(
        extra, on="case_id", how="left")
    print(f"kept the manifest's column(s) {', '.join(kept)} beside the features (not "
          "features themselves: train-classifier takes one as --label-column; give the "
          "others to --exclude)")
    return merged[["case_id", *kept, *[c for c in table.columns if c != "case_id"]]]


def _add_batch(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="the whole pipeline over a cohort: a row of features (and a prediction) per case",
        description="For each case of the manifest: preprocess (the modality presets), "
        "register every further modality to the first, take the case's mask (--mask-column) "
        "or segment the lesion (--segmentation), measure the IBSI features of every modality "
        "in it and, with --classifier, predict. Writes a row per case (the manifest's "
        "outcome columns after case_id, then the features, then prediction, probability and "
        "threshold) to --output after every case, and a record beside it (for rows.csv, "
        "rows.batch.json: the settings, and each case's status, time and registration "
        "metrics, warnings, region size), so an interrupted run loses nothing: --resume "
        "measures only the cases still missing. Exit status 0: every case measured (and "
        "predicted); 1: some failed (--skip-failed) or got no prediction; 2: an error, or "
        "no case measured.",
    )
    parser.add_argument("--manifest", type=Path, required=True, help="cohort CSV")
    parser.add_argument("--modalities", required=True,
                        help="comma-separated modalities (the manifest's image columns, e.g. "
                        "CT,PET,MR_T1; t1 is MR_T1); the first is the reference every other "
                        "one is registered to and measured on")
    parser.add_argument("--output", "-o", type=Path, required=True, help="the table (CSV)")
    region = parser.add_argument_group("the region measured (one of)")
    region.add_argument("--mask-column", help="the manifest column holding each case's mask "
                        "(a mask drawn on a moving modality, e.g. PET_mask, follows its "
                        "registration)")
    region.add_argument("--segmentation", choices=("model", "threshold"),
                        help="segment the lesion: with a trained model (--model), or PET "
                        "40%% of SUVmax around the hottest voxel (threshold)")
    region.add_argument("--model", type=Path, help="segmentation model file/folder")
    parser.add_argument("--registration", choices=("rigid", "affine", "deformable", "none"),
                        default="rigid", help="none: the images are already aligned (they "
                        "are only resampled onto the reference grid; default: rigid)")
    parser.add_argument("--metric", choices=METRIC_CHOICES, default="auto",
                        help="registration metric (default: by modality pair)")
    parser.add_argument("--no-preprocess", action="store_true",
                        help="measure the images as read, without the modality presets")
    parser.add_argument("--settings", type=Path,
                        help="JSON or YAML file of IBSI feature settings (see FeatureSettings)")
    parser.add_argument("--classifier", type=Path, help="a saved radiomics classifier: adds "
                        "its prediction (a classifier trained from images measures every "
                        "case as in its training: its feature settings, the images as read)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--save-dir", type=Path, help="also write each case's measured "
                        "region and registrations (warped image, transform, metrics, QC "
                        "figure) to SAVE_DIR/<case_id>/")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cases an earlier run with the same settings measured "
                        "in --output and measure the others")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output (refused without this, or "
                        "--resume for an earlier batch's table)")
    parser.add_argument("--skip-failed", action="store_true",
                        help="a case that cannot be read or measured gets a row with its error "
                        "and the batch goes on (default: the batch stops at it, its rows so "
                        "far written)")
    parser.set_defaults(func=_run_batch)


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed (for a record), from the arguments ``main`` parsed."""
    import shlex

    return " ".join(shlex.quote(str(a)) for a in ["mma", *getattr(args, "argv", [])])


def _run_batch(args: argparse.Namespace) -> int:
    from MultiModalAnalysisLib.batch import (
        BatchOutput,
        check_batch,
        describe_batch,
        manifest_cases,
        manifest_extra,
        manifest_sources,
        record_path,
        run_batch,
        with_classifier_settings,
    )
    from MultiModalAnalysisLib.case import read_manifest
    from MultiModalAnalysisLib.errors import ConfigError
    from MultiModalAnalysisLib.workflow import WorkflowSettings

    if args.mask_column and args.segmentation:
        raise ConfigError("give --mask-column (each case's mask is measured) or "
                          "--segmentation (the lesion is segmented), not both.")
    if not args.mask_column and not args.segmentation:
        raise ConfigError("say what to measure: --mask-column (each case's mask, e.g. "
                          "CT_mask) or --segmentation model --model M / --segmentation "
                          "threshold.")
    if args.model is not None and args.segmentation != "model":
        raise ConfigError("--model is the segmentation model: it goes with --segmentation "
                          "model.")
    if args.resume and args.overwrite:
        raise ConfigError("--resume keeps an earlier run's rows, --overwrite replaces them: "
                          "give one.")
    if args.save_dir is not None:
        if args.save_dir.exists() and not args.save_dir.is_dir():
            raise ConfigError(f"--save-dir {args.save_dir} is a file: give a folder.")
        save_dir = args.save_dir.resolve()
        if save_dir in (args.output.resolve(), record_path(args.output).resolve()):
            raise ConfigError("--save-dir and --output name the same path: give the per-case "
                              "files a folder of their own.")
        inside = sorted(str(path) for path in _files_listed_in(args.manifest)
                        if path.is_relative_to(save_dir))
        if inside:
            raise ConfigError(
                f"--save-dir {args.save_dir} holds files the manifest reads (e.g. "
                f"{inside[0]}), and a case's files there would be replaced: give a folder "
                "outside the data.")
        _check_writable(args.save_dir, "--save-dir", args.save_dir)
    if args.output.exists() and not args.resume and not args.overwrite:
        if record_path(args.output).exists():
            raise ConfigError(
                f"{args.output} holds an earlier batch's rows (its record "
                f"{record_path(args.output).name} is beside it): --resume goes on with it, "
                "--overwrite starts again, or give another --output.")
        raise ConfigError(f"{args.output} exists (and is no batch table with its record): "
                          "--overwrite replaces it, or give another --output.")
    settings = WorkflowSettings(
        preprocess=not args.no_preprocess, registration_type=args.registration,
        registration_metric=args.metric, device=args.device,
        segmentation_method=args.segmentation or "",
        segmentation_model=str(args.model) if args.model else "",
        feature_settings=str(args.settings) if args.settings else "",
        classifier=str(args.classifier) if args.classifier else "", show_3d=False,
    )
    modalities = check_batch(settings, [m.strip() for m in args.modalities.split(",")
                                        if m.strip()], args.mask_column)
    # (the record names what is used; run_batch warns if it is not the classifier's own)
    settings = with_classifier_settings(settings, warn=False)
    if args.classifier is not None:
        from MultiModalAnalysisLib.classification import load_classifier
        from MultiModalAnalysisLib.classification.model import TrainedClassifier

        if not isinstance(load_classifier(args.classifier), TrainedClassifier):
            raise ConfigError(f"--classifier {args.classifier} is a deep classifier, which "
                              "reads the images itself: use mma classify with it.")
    if args.settings is not None:
        from MultiModalAnalysisLib.features import load_settings

        load_settings(args.settings)  # a wrong settings file: said before any case
    manifest = read_manifest(args.manifest)
    cases = manifest_cases(manifest, modalities, args.mask_column)
    description = describe_batch(settings, manifest=args.manifest, modalities=modalities,
                                 mask_column=args.mask_column)
    options = {"order": [c for c, _ in cases], "extra": manifest_extra(manifest),
               "save_dir": args.save_dir, "command": _command_line(args)}
    output = (BatchOutput.resume(args.output, description, **options, sources=manifest_sources(
                  manifest, modalities, args.mask_column))
              if args.resume else BatchOutput(args.output, description, **options))
    done = set(output.done)
    if done:
        print(f"--resume: {len(done)} of {len(cases)} cases were measured before and are "
              "kept")
    todo = [(c, read) for c, read in cases if c not in done]
    table = None
    try:
        if todo:
            with ProgressBar("batch", enabled=not args.quiet) as bar:
                new = run_batch(todo, settings, modalities=modalities,
                                mask_name=args.mask_column, progress=bar,
                                on_error="record" if args.skip_failed else "stop",
                                on_case=output)
            table = output.finish(new)
        else:
            table = output.write()
    except MMAError:
        if output.done:
            print(f"mma batch: {len(output.done)} case(s) measured so far are in "
                  f"{args.output}; after a fix, --resume measures the others (or "
                  "--skip-failed records a failing case and goes on).", file=sys.stderr)
        raise
    except BaseException:  # Ctrl-C, a cancel, or a bug: say what is kept, then stop
        print(f"mma batch: {len(output.done)} case(s) measured so far are in {args.output}: "
              "--resume measures the others.", file=sys.stderr)
        raise
    failed = [c for c in output.order if output.cases.get(c, {}).get("status") == "failed"]
    warned = [c for c in output.done if output.cases[c].get("warnings")]
    print(f"{len(output.done)} of {len(cases)} cases measured"
          + (f"; {len(failed)} failed: {', '.join(failed)} (their row's error column says "
             "why)" if failed else "")
          + (f"; {len(warned)} with warnings ({output.record.name} lists them per case)"
             if warned else "")
          + f"; wrote {args.output} and {output.record.name}")
    unpredicted = "prediction_error" in table.columns
    if unpredicted:
        print(f"no predictions: {table['prediction_error'].iloc[0]}", file=sys.stderr)
    if not output.done:
        return 2
    return 1 if failed or unpredicted else 0  # (1: a cohort script sees a partial run)


def _add_info(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="print versions and the compute device")
    parser.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import monai
    import SimpleITK as sitk
    import torch

    from MultiModalAnalysisLib.device import describe_device

    print(f"MultiModalAnalysis {__version__}")
    print(f"torch {torch.__version__}, MONAI {monai.__version__}, "
          f"SimpleITK {sitk.Version_VersionString()}")
    print(f"device (auto): {describe_device('auto')}")
    return 0


def _add_train_classifier(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-classifier",
        help="cross-validate a classifier, then fit it on every case and save it",
        description="Radiomics (default): the manifest is a FEATURE TABLE: case_id, one "
        "numeric column per feature (as `mma features` writes them) and the label column; "
        "or an IMAGE MANIFEST (one path column per modality, a mask column, the label "
        "column), whose IBSI features are computed first (--modalities, --mask-column, "
        "--feature-settings) and remembered by the model for `mma classify`. Prints and "
        "writes (CLF/cv_metrics.json) the figures of a repeated stratified nested "
        "cross-validation, then fits the model on every case and saves the folder CLF. "
        "--kind deep trains a CNN on ROI crops instead; its manifest holds image paths "
        "(one column per modality) and a mask column.",
    )
    parser.add_argument("--manifest", type=Path, required=True, help="cohort CSV")
    parser.add_argument("--label-column", required=True, help="the outcome column")
    parser.add_argument("--output", "-o", type=Path, required=True, help="model folder")
    parser.add_argument("--cv", type=int, default=None, metavar="K",
                        help="outer CV folds (default 5 radiomics, 0 deep; 0 skips the CV)")
    parser.add_argument("--repeats", type=_whole_positive, default=None,
                        help="CV repeats (default 10; 1 for --kind deep)")
    parser.add_argument("--positive-label", default=None,
                        help="label value of the positive class (default: the larger)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    parser.add_argument("--kind", choices=("radiomics", "deep"), default="radiomics")
    radiomics = parser.add_argument_group("radiomics classifier")
    radiomics.add_argument("--settings", type=Path, help="ClassifierSettings as JSON")
    radiomics.add_argument("--classifier", choices=CLASSIFIER_CHOICES, default=None)
    radiomics.add_argument("--selection", choices=SELECTION_CHOICES, default=None)
    radiomics.add_argument("--n-features", type=int, nargs="+", default=None,
                           help="numbers of selected features to try (inner CV); "
                           "with --selection mrmr, univariate or l1")
    radiomics.add_argument("--feature-settings", type=Path, default=None,
                           help="IBSI feature settings (JSON/YAML) for an image manifest")
    radiomics.add_argument("--exclude", nargs="+", default=(), metavar="COLUMN",
                           help="columns that are not features (e.g. other outcomes)")
    radiomics.add_argument("--features", dest="feature_pattern", default=None,
                           metavar="REGEX", help="use only feature columns matching this")
    radiomics.add_argument("--skip-failed", action="store_true",
                           help="with an image manifest: leave out a case whose images cannot "
                           "be read or measured (with a warning naming it) instead of "
                           "stopping")
    deep = parser.add_argument_group("deep classifier (--kind deep)")
    images = parser.add_argument_group("image manifests (deep, or radiomics from images)")
    images.add_argument("--modalities", default=None,
                        help="image columns in order, e.g. CT,PET (default radiomics: every "
                        "image column that is not a mask)")
    images.add_argument("--mask-column", default=None,
                        help="the lesion mask column (default: 'mask', or the only mask-like "
                        "column, else the mask of the first modality used, e.g. CT_mask)")
    deep.add_argument("--epochs", type=_whole_positive, default=None, help="(default 40)")
    deep.add_argument("--architecture", choices=("densenet", "resnet"), default=None,
                      help="(default densenet)")
    deep.add_argument("--crop-size", type=_whole_positive, default=None,
                      help="crop side in voxels (default 32)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="torch device for feature extraction and the deep classifier")
    parser.set_defaults(func=_run_train_classifier)


def _classifier_settings(args: argparse.Namespace):
    from MultiModalAnalysisLib.classification import load_settings

    settings = load_settings(args.settings).to_dict()
    overrides = {
        "classifier": args.classifier, "selection": args.selection,
        "n_features": args.n_features, "cv_folds": args.cv or None,
        "cv_repeats": args.repeats, "random_state": args.seed,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    from MultiModalAnalysisLib.classification.estimators import uses_n_features
    from MultiModalAnalysisLib.errors import ConfigError

    if args.n_features is not None and not uses_n_features(settings["selection"]):
        raise ConfigError(
            f"--selection {settings['selection']} does not use --n-features: it keeps every "
            "feature it does not filter out. Drop --n-features, or choose a selection that "
            "picks that many (mrmr, univariate, l1).")
    return load_settings(settings)


RADIOMICS_ONLY = ("settings", "classifier", "selection", "n_features", "feature_settings",
                  "exclude", "feature_pattern", "skip_failed")
DEEP_ONLY = ("epochs", "architecture", "crop_size")


def _run_train_classifier(args: argparse.Namespace) -> int:
    from MultiModalAnalysisLib.errors import ConfigError

    other = RADIOMICS_ONLY if args.kind == "deep" else DEEP_ONLY
    unused = ["--" + {"feature_pattern": "features"}.get(name, name).replace("_", "-")
              for name in other if getattr(args, name) not in (None, False, ())]
    if unused:
        raise ConfigError(f"--kind {args.kind} does not use {', '.join(unused)}: drop "
                          f"{'it' if len(unused) == 1 else 'them'} (see mma train-classifier "
                          "--help).")
    if args.cv is not None and (args.cv < 0 or args.cv == 1):
        raise ConfigError(f"--cv {args.cv}: give 2 or more folds, or 0 to skip the "
                          "cross-validation.")
    if args.kind == "deep":
        return _train_deep_classifier(args)
    from MultiModalAnalysisLib.classification import read_feature_table, train_classifier
    from MultiModalAnalysisLib.classification.table import UNMEASURED

    settings = _classifier_settings(args)
    from MultiModalAnalysisLib.classification.estimators import build_model

    build_model(settings)  # a param_grid that does not fit the pipeline: now, not after
    if args.positive_label is not None:  # a wrong one: now, not after the features
        from MultiModalAnalysisLib.case import read_manifest
        from MultiModalAnalysisLib.classification.labels import encode_labels

        table = read_manifest(args.manifest).table
        if args.label_column in table.columns:
            encode_labels(table[args.label_column].dropna(), args.positive_label,
                          what=f"label column {args.label_column}")
    _refuse_image_options_for_a_table(args.manifest, {
        "--skip-failed": args.skip_failed, "--mask-column": args.mask_column,
        "--modalities": args.modalities, "--feature-settings": args.feature_settings})
    extraction = {"on_error": "skip"} if args.skip_failed else {}
    with ProgressBar("features", enabled=not args.quiet) as bar:
        table = read_feature_table(
            args.manifest, args.label_column, exclude=args.exclude,
            feature_pattern=args.feature_pattern, mask_column=args.mask_column,
            modalities=args.modalities.split(",") if args.modalities else None,
            feature_settings=args.feature_settings, device=args.device, progress=bar,
            **extraction)
    unmeasured = [c for c, why in table.excluded_cases.items()
                  if why.startswith(UNMEASURED)]
    unlabelled = len(table.excluded_cases) - len(unmeasured)
    print(f"{len(table)} cases, {table.features.shape[1]} features from {args.manifest}"
          + (f"; left out {unlabelled} case(s) without a label" if unlabelled else "")
          + (f"; left out {len(unmeasured)} case(s) that could not be measured: "
             f"{', '.join(unmeasured)} (see the warnings)" if unmeasured else ""))
    with ProgressBar("train-classifier", enabled=not args.quiet) as bar:
        model = train_classifier(table, settings=settings, positive_label=args.positive_label,
                                 evaluate=args.cv != 0, output=args.output, progress=bar)
    if model.cv_result is not None:
        print(model.cv_result.describe())
        print(f"cross-validated figures: {args.output / 'cv_metrics.json'}")
    from MultiModalAnalysisLib.classification.model import fitted_model

    print(f"final model: {fitted_model(model.metadata)}, {len(model.used_features)} of "
          f"{len(model.feature_names)} features used ({', '.join(model.used_features[:8])}"
          f"{' ...' if len(model.used_features) > 8 else ''}); saved to {args.output}")
    return 0


def _train_deep_classifier(args: argparse.Namespace) -> int:
    from MultiModalAnalysisLib.classification.crops import CropSettings
    from MultiModalAnalysisLib.classification.deep import train_deep_classifier
    from MultiModalAnalysisLib.errors import ConfigError

    if not args.modalities:
        raise ConfigError("--kind deep needs --modalities (e.g. CT,PET,MR_T1).")
    from MultiModalAnalysisLib.case import read_manifest
    from MultiModalAnalysisLib.classification.table import default_mask_column, image_path_columns

    manifest = read_manifest(args.manifest)  # read once: the mask column default and training
    if not image_path_columns(manifest.table):
        raise ConfigError(f"{args.manifest} holds no image paths: --kind deep learns from the "
                          "images (a manifest with one path column per modality and a mask "
                          "column); a feature table is for the radiomics classifier.")
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    mask_column = args.mask_column or default_mask_column(manifest, modalities)
    architecture, epochs = args.architecture or "densenet", args.epochs or 40
    network = {"architecture": architecture, "epochs": epochs}
    if args.seed is not None:
        network["random_state"] = args.seed
    with ProgressBar("train-classifier (deep)", enabled=not args.quiet) as bar:
        model = train_deep_classifier(
            manifest, args.label_column, modalities, mask_column,
            crop=CropSettings(size=args.crop_size or 32), network=network,
            cv_folds=args.cv or 0, cv_repeats=args.repeats or 1,
            positive_label=args.positive_label, device=args.device, output=args.output,
            progress=bar,
        )
    if model.cv_result is not None:
        print(model.cv_result.describe())
    losses = model.metadata["model"]["loss_history"]
    print(f"trained {architecture} on {model.metadata['training_cohort']['n_cases']} "
          f"cases ({epochs} epochs, final loss {losses[-1]:.3f}); saved to {args.output}")
    return 0


def _add_classify(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "classify",
        help="per-case probabilities from a saved classifier",
        description="Radiomics models read a FEATURE TABLE (case_id + the features the model "
        "was trained on), or an image manifest when the model was trained from images (its "
        "features are then computed as in training); deep models read a manifest of image "
        "paths with the model's mask "
        "column. Writes case_id, probability_<positive class>, prediction, threshold (and "
        "error, for a case --skip-failed could not measure).",
    )
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--manifest", type=Path, required=True, help="cohort CSV")
    parser.add_argument("--mask-column", help="with an image manifest: the column holding "
                        "each case's region of interest (default: as in training, else "
                        "'mask', the manifest's only mask column, or the mask of the first "
                        "modality)")
    parser.add_argument("--output", "-o", type=Path, required=True, help="predictions CSV")
    parser.add_argument("--skip-failed", action="store_true",
                        help="radiomics model, image manifest: a case whose images cannot be "
                        "read or measured gets no prediction (a warning names it; its row's "
                        "error column says why) instead of stopping the run")
    parser.set_defaults(func=_run_classify)


def _run_classify(args: argparse.Namespace) -> int:
    import pandas as pd

    from MultiModalAnalysisLib.classification import load_classifier
    from MultiModalAnalysisLib.classification.model import TrainedClassifier
    from MultiModalAnalysisLib.errors import ConfigError

    model = load_classifier(args.model)
    _refuse_image_options_for_a_table(args.manifest, {
        "--skip-failed": args.skip_failed, "--mask-column": args.mask_column})
    options = {"mask_column": args.mask_column} if args.mask_column else {}
    if args.skip_failed:
        if not isinstance(model, TrainedClassifier):
            raise ConfigError("--skip-failed applies to radiomics classifiers; a deep "
                              "classifier reads every case of the manifest.")
        options["on_error"] = "skip"
    with ProgressBar("classify", enabled=not args.quiet) as bar:
        predictions = model.predict_manifest(args.manifest, progress=bar, **options)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(args.output, index=False)
    positive = model.class_names[1]
    unmeasured = (predictions["error"].notna() if "error" in predictions.columns
                  else pd.Series(False, index=predictions.index))
    left_out = predictions["case_id"][unmeasured].astype(str).tolist()
    print(f"{int((~unmeasured).sum())} cases: "
          f"{int((predictions['prediction'] == positive).sum())} predicted {positive}"
          + (f"; {len(left_out)} case(s) could not be measured and have no prediction: "
             f"{', '.join(left_out)} (their row's error column says why)" if left_out else "")
          + f"; wrote {args.output}")
    if (model.metadata.get("model") or {}).get("calibrated") is False:
        print("the probabilities are the classifier's scores mapped to 0-1, not calibrated "
              "(see the model card): rank cases by them, but do not read them as risks")
    _print_external_auc(args.manifest, model, predictions[~unmeasured])
    return 0


def _refuse_image_options_for_a_table(manifest: Path, given: dict[str, object]) -> None:
    """Options that only an image manifest uses (its features are computed here) are an
    error with a feature table, not silently ignored."""
    from MultiModalAnalysisLib.case import read_manifest
    from MultiModalAnalysisLib.classification.table import image_path_columns
    from MultiModalAnalysisLib.errors import ConfigError

    used = [name for name, value in given.items() if value]
    if used and not image_path_columns(read_manifest(manifest).table):
        raise ConfigError(
            f"{', '.join(used)} appl{'ies' if len(used) == 1 else 'y'} to an image manifest, "
            f"whose features are computed here; {manifest} is a feature table (no image "
            f"paths): drop {'it' if len(used) == 1 else 'them'}.")


def _print_external_auc(manifest: Path, model, predictions) -> None:
    """When the manifest holds the model's label column, say how well it did there."""
    import numpy as np
    import pandas as pd

    from MultiModalAnalysisLib.classification.labels import normalise_label
    from MultiModalAnalysisLib.metrics import roc_auc

    column = model.metadata["label"]["column"]
    table = pd.read_csv(manifest, dtype={"case_id": str})
    if column not in table.columns:
        return
    truth = table.set_index(table["case_id"].astype(str).str.strip())[column]
    truth = truth.reindex(predictions["case_id"])
    known = truth.notna().to_numpy()
    # 1.0 and 1 are one label (a CSV column with a gap reads as float)
    labels = np.array([str(normalise_label(v)) == str(normalise_label(model.class_names[1]))
                       for v in truth[known]], dtype=int)
    if known.sum() and 0 < labels.sum() < len(labels):
        auc = roc_auc(labels, predictions.iloc[:, 1].to_numpy()[known])
        line = f"AUC against {column} in the manifest ({int(known.sum())} cases): {auc:.3f}"
        trained = set(map(str, (model.metadata.get("training_cohort") or {}).get("case_ids")
                          or ()))
        seen = int(predictions["case_id"].astype(str)[known].isin(trained).sum())
        if seen:
            cv_auc = (model.metadata.get("cross_validation") or {}).get("auc")
            line += (f" (in-sample: {seen} of them were training cases, so this flatters the "
                     "model" + (f"; its cross-validated AUC is {cv_auc:.3f}" if cv_auc is not
                                None else "") + ")")
        print(line)


def _add_register(subparsers: argparse._SubParsersAction) -> None:
    from MultiModalAnalysisLib.device import DEVICE_CHOICES

    parser = subparsers.add_parser(
        "register",
        help="register MOVING onto FIXED (rigid, affine or deformable)",
        description="Register the moving image onto the fixed one and write the moving image "
        "resampled on the fixed grid (warped.nii.gz), the transform (transform.tfm for rigid/"
        "affine, transform.h5 for deformable or after a non-linear --initial-transform; "
        "fixed-space point -> moving-space point, readable "
        "by SimpleITK.ReadTransform), metrics.json and a QC figure (qc.png).",
    )
    parser.add_argument("fixed", type=Path, help="the fixed (reference) image")
    parser.add_argument("moving", type=Path, help="the image to move onto the fixed one")
    parser.add_argument("--transform", choices=TRANSFORM_CHOICES, required=True)
    parser.add_argument("--output-dir", type=Path, required=True, help="where to write")
    parser.add_argument("--metric", choices=METRIC_CHOICES, default="auto",
                        help="similarity (auto: by modality pair; default); mind: deformable "
                        "(torch backend) only")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="torch device of the deformable torch backend; deformable only")
    parser.add_argument("--fixed-mask", type=Path, help="region of the fixed image to match")
    parser.add_argument("--moving-mask", type=Path, help="region of the moving image to use")
    parser.add_argument("--mask-margin", type=_distance, metavar="MM",
                        help="how far around each mask the metric also looks (default: 10 mm "
                        "for a mask covering less than half its image, e.g. a lesion, else "
                        "0; 0 keeps the masks exactly)")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                        help="backend of the deformable stage (auto: torch); deformable only")
    parser.add_argument("--fixed-modality", help="e.g. CT (default: from the file name)")
    parser.add_argument("--moving-modality", help="e.g. PET, MR_T1 (default: from the name)")
    parser.add_argument("--landmarks", type=Path,
                        help="CSV of paired points (fixed_x,fixed_y,fixed_z,moving_x,moving_y,"
                        "moving_z in LPS mm): initial transform and TRE report")
    parser.add_argument("--initial-transform", type=Path,
                        help="transform file (fixed -> moving) to start from")
    parser.add_argument("--threads", type=_whole_positive,
                        help="CPU threads scoring rigid/affine poses (default: up to 2; the "
                        "result does not depend on it)")
    parser.add_argument("--no-qc", action="store_true", help="do not write qc.png")
    parser.set_defaults(func=_run_register)


def _number_type(convert, low: float, high: float, what: str):
    """An argparse type: ``convert(text)`` within [low, high] (NaN refused), else an error
    that says what is expected."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what}, not {text!r}")
        return value

    return parse


_distance = _number_type(float, 0.0, 1e6, "a distance >= 0 in mm")
_whole_positive = _number_type(int, 1, float("inf"), "a whole number >= 1")
_fraction = _number_type(float, 0.0, 1.0, "a number from 0 to 1")
_finite = _number_type(float, -1e300, 1e300, "a finite number")
_volume = _number_type(float, 0.0, 1e12, "a volume >= 0 in mm^3")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _run_register(args: argparse.Namespace) -> int:
    from MultiModalAnalysisLib.errors import ConfigError
    from MultiModalAnalysisLib.io import read_image, read_mask
    from MultiModalAnalysisLib.registration import read_landmarks_csv, register

    if args.transform != "deformable":  # options of the deformable stage alone
        if args.device != "auto":  # harmless: scripts pass it for every transform
            log.warning("--device applies to the deformable stage only; ignored for %s %s "
                        "registration.", _article(args.transform), args.transform)
            args.device = "auto"  # (ignored indeed: --device cuda on a CPU machine failed)
        unused = [f"--backend {args.backend}"] if args.backend != "auto" else []
        if args.metric == "mind":
            unused.append("--metric mind (a deformable, torch-backend metric)")
        if unused:
            one = len(unused) == 1
            raise ConfigError(f"{', '.join(unused)}: only the deformable stage uses "
                              f"{'this' if one else 'these'}; {_article(args.transform)} "
                              f"{args.transform} registration would ignore "
                              f"{'it' if one else 'them'}. Leave "
                              f"{'it' if one else 'them'} out, or use --transform deformable.")
    elif args.metric == "mind" and args.backend == "bspline":
        raise ConfigError("--metric mind runs on the torch backend only: use --backend torch "
                          "(or auto), or --metric mi with the B-spline backend.")
    fixed_modality = args.fixed_modality or _modality_from_name(args.fixed)
    moving_modality = args.moving_modality or _modality_from_name(args.moving)
    fixed = read_image(args.fixed, modality=fixed_modality)
    moving = read_image(args.moving, modality=moving_modality)
    fixed_mask = read_mask(args.fixed_mask) if args.fixed_mask else None
    moving_mask = read_mask(args.moving_mask) if args.moving_mask else None
    landmarks = read_landmarks_csv(args.landmarks) if args.landmarks else None
    initial = _read_transform(args.initial_transform) if args.initial_transform else None
    with ProgressBar("register", enabled=not args.quiet) as bar:
        result = register(
            fixed, moving, args.transform, metric=args.metric, fixed_mask=fixed_mask,
            moving_mask=moving_mask, initial_transform=initial, device=args.device,
            backend=args.backend, fixed_modality=fixed_modality,
            moving_modality=moving_modality, progress=bar, landmarks=landmarks,
            threads=args.threads, mask_margin_mm=args.mask_margin)
    paths = result.save(args.output_dir, qc=not args.no_qc)
    metrics = result.metrics
    before = metrics["metric_before"]  # None: nothing overlapped where the images started
    print(f"{args.transform} registration of {args.moving.name} onto {args.fixed.name} in "
          f"{metrics['runtime_s']:.1f} s; {metrics['metric']}: "
          f"{'no overlap at the start' if before is None else before} -> "
          f"{metrics['metric_after']}")
    if "folding_percent" in metrics:
        print(f"Jacobian determinant {metrics['jacobian_min']} .. {metrics['jacobian_max']}, "
              f"{metrics['folding_percent']}% folded voxels")
    if "tre_mm_mean" in metrics:
        print(f"landmark TRE: mean {metrics['tre_mm_mean']} mm, max {metrics['tre_mm_max']} mm")
    # (result.warnings were logged, to stderr, as they were raised: not printed again)
    for name, path in paths.items():
        print(f"  {name:<10} {path}")
    return 0


@contextlib.contextmanager
def _quiet_stderr():
    """Silence what C libraries write to the process's stderr (file descriptor 2)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _read_transform(path: Path):
    import SimpleITK as sitk

    from MultiModalAnalysisLib.errors import ImageReadError
    from MultiModalAnalysisLib.io import itk_warnings_off

    if not path.is_file():
        raise ImageReadError(f"--initial-transform {path}: no such file. Check the path.")
    try:
        # (HDF5 prints its own diagnostics for a file it cannot read)
        with itk_warnings_off(), _quiet_stderr():
            return sitk.ReadTransform(str(path))
    except RuntimeError:
        raise ImageReadError(f"{path} could not be read as a transform file (.tfm, .txt, "
                             ".h5, .mat).") from None


def _modality_from_name(path: Path) -> str | None:
    """The modality a file name announces (``CT_image.nii.gz`` -> CT), or None."""
    from MultiModalAnalysisLib.io import IMAGE_SUFFIXES
    from MultiModalAnalysisLib.modalities import FAMILIES, canonical_modality

    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem = name[: -len("_image")] if name.lower().endswith("_image") else name
    modality = canonical_modality(stem)
    return modality if modality in FAMILIES else None


def _add_fuse(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fuse",
        help="fuse co-registered images into one (average, maximum, wavelet, ...)",
        description="Fuse images that are already in one frame (e.g. after mma register) on "
        "the REFERENCE grid. Intensities are scaled to [0, 1] per image first (wavelet: "
        "[0, 255], as in Vallieres et al. 2015).",
    )
    parser.add_argument("reference", type=Path, help="the image whose grid the result takes")
    parser.add_argument("images", type=Path, nargs="+", help="images to fuse with it")
    parser.add_argument("--method", choices=FUSION_CHOICES, required=True)
    parser.add_argument("--output", "-o", type=Path, required=True, help="F.nii.gz")
    parser.add_argument("--weights", type=float, nargs="+",
                        help="average: one weight per image, REFERENCE included (default: "
                        "equal)")
    parser.add_argument("--weight", type=_fraction,
                        help="wavelet: weight of the second image, 0..1 (default 0.5)")
    parser.add_argument("--wavelet", help="wavelet: PyWavelets name (default sym8)")
    parser.add_argument("--level", type=int, help="wavelet: decomposition levels (default 1)")
    parser.add_argument("--mask", type=Path, help="wavelet: region of interest")
    parser.add_argument("--square-mm", type=float,
                        help="checkerboard: cube size in mm (default 10)")
    parser.add_argument("--colormap", help="overlay: matplotlib colour map (default hot)")
    parser.add_argument("--pyramid-levels", type=int, help="laplacian: levels (default 3)")
    parser.set_defaults(func=_run_fuse)


# each fusion option's method, and the engine's keyword for it
FUSE_OPTIONS = {
    "weights": ("average", "weights"), "square_mm": ("checkerboard", "square_mm"),
    "colormap": ("overlay", "colormap"), "pyramid_levels": ("laplacian", "levels"),
    "weight": ("wavelet", "weight_b"), "wavelet": ("wavelet", "wavelet"),
    "level": ("wavelet", "level"), "mask": ("wavelet", "mask"),
}


def _run_fuse(args: argparse.Namespace) -> int:
    from MultiModalAnalysisLib.errors import ConfigError
    from MultiModalAnalysisLib.fusion import fuse
    from MultiModalAnalysisLib.io import read_image, read_mask, write_image

    # An option of another method is refused, not dropped: "--weight 0.3" given to an
    # average (whose option is --weights) would otherwise give an unweighted result.
    foreign = [f"--{option.replace('_', '-')} ({method})"
               for option, (method, _) in FUSE_OPTIONS.items()
               if getattr(args, option) is not None and method != args.method]
    if foreign:
        own = [f"--{option.replace('_', '-')}" for option, (method, _) in FUSE_OPTIONS.items()
               if method == args.method]
        raise ConfigError(f"--method {args.method} does not use {', '.join(foreign)}: leave "
                          f"{'it' if len(foreign) == 1 else 'them'} out"
                          + (f" ({args.method} fusion takes {', '.join(own)})." if own
                             else f" ({args.method} fusion takes no option)."))
    paths = [args.reference, *args.images]
    images = [read_image(path) for path in paths]
    options = {}
    for option, (_, keyword) in FUSE_OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            options[keyword] = read_mask(value) if option == "mask" else value
    fused = fuse(images, args.method, names=[str(p) for p in paths], **options)
    print(f"wrote {write_image(fused, args.output)} ({args.method} fusion of "
          f"{len(images)} images on the grid of {args.reference.name})")
def _image_argument(value: str) -> tuple[str | None, Path]:
    """``NAME=PATH`` -> (NAME, PATH); a bare path -> (its modality from the file name, PATH)."""
    from MultiModalAnalysisLib.case import _classify_file, _strip_suffix
    from MultiModalAnalysisLib.errors import ConfigError

    name, sep, path = value.partition("=")
    if sep and not Path(value).exists():
        if not name.strip() or not path.strip():
            raise ConfigError(f"image {value!r}: write NAME=PATH (e.g. PET=pet.nii.gz) or a "
                              "bare path.")
        return name.strip(), Path(path)
    stem = _strip_suffix(Path(value).name)
    kind = _classify_file(stem) if stem else None
    return (kind[1] if kind and kind[0] == "image" else None), Path(value)


def _named_images(arguments: Sequence[str], model_modalities: Sequence[str] | None) -> dict:
    """Read the IMAGE arguments into an ordered {modality: image} mapping.

    Explicit ``NAME=PATH`` names win; bare paths are named from their file name (``CT.nii.gz``,
    ``PET_image.nii.gz`` ...); with a model, bare paths whose name cannot be told from the file
    name take the model's modalities in order; otherwise ``image1``, ``image2`` ...
    """
    from MultiModalAnalysisLib.errors import ConfigError
    from MultiModalAnalysisLib.images import implausible_intensities
    from MultiModalAnalysisLib.io import read_image

    parsed = [_image_argument(a) for a in arguments]
    if model_modalities and any(name is None for name, _ in parsed):
        if len(parsed) != len(model_modalities):
            raise ConfigError(
                f"the model takes {len(model_modalities)} images ({', '.join(model_modalities)})"
                f" but {len(parsed)} were given: give one per modality, e.g. "
                + " ".join(f"{m}=..." for m in model_modalities) + "."
            )
        by_order = {i for i, (name, _) in enumerate(parsed) if name is None}
        parsed = [(name or model_modalities[i], path) for i, (name, path) in enumerate(parsed)]
        for i in sorted(by_order):
            log.info("%s taken as %s (the model's order; write NAME=PATH to say otherwise)",
                     parsed[i][1], parsed[i][0])
    images = {}
    for i, (name, path) in enumerate(parsed):
        key = name or f"image{i + 1}"
        if key in images:
            raise ConfigError(f"two images are named {key}: name them NAME=PATH.")
        images[key] = read_image(path, name=f"{key} ({path})", modality=name)
        doubt = implausible_intensities(key, images[key]) if not model_modalities else None
        if doubt:  # (a model refuses such inputs: SegmentationModel.check_inputs)
            log.warning("%s (%s): %s; is it the right image?", key, path, doubt)
    return images


def _add_segment(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment co-registered images (GMM, k-means, threshold, or a trained model)",
        description="Segment one or more co-registered images; the labels are written on the "
        "first image's grid. Name each image NAME=PATH (e.g. CT=ct.nii.gz PET=pet.nii.gz); a "
        "bare path is named from its file name (CT_image.nii.gz -> CT) or, with --model, by "
        "the model's modalities in order.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="NAME=PATH or PATH")
    parser.add_argument("--method", required=True, choices=["gmm", "kmeans", "threshold", "model"])
    parser.add_argument("--classes", type=_whole_positive,
                        help="gmm/kmeans classes (default 3)")
    parser.add_argument("--model", type=Path, help="model: a model file/folder or a MONAI "
                        "bundle folder")
    parser.add_argument("--mask", type=Path, help="segment inside this region only")
    parser.add_argument("--output", "-o", type=Path, required=True, help="label map to write")
    parser.add_argument("--probabilities", type=Path,
                        help="write the probabilities here, a vector image whose component "
                        "k is label k's probability (component 0: background, or for "
                        "gmm/kmeans outside the mask; a multi-label, sigmoid MONAI bundle "
                        "has no background: component k is label k+1's own probability), "
                        "and the uncertainty map next to it "
                        "as <name>_uncertainty.nii.gz where the method gives one (model: "
                        "variance of the foreground probability over the test-time passes, "
                        "none with --no-tta or a MONAI bundle; gmm/kmeans: 1 - the largest "
                        "class probability; threshold: no probabilities)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"],
                        help="model: where the network runs (default auto: the GPU when "
                        "there is one)")
    parser.add_argument("--order-by", help="gmm/kmeans: order classes by this image's mean")
    parser.add_argument("--regularisation", choices=["icm", "smoothing", "none"],
                        help="gmm/kmeans spatial regularisation (default icm)")
    parser.add_argument("--threshold", choices=["otsu", "range", "suv-fraction"],
                        help="threshold kind (default: range with --low/--high, "
                        "suv-fraction with --fraction or on PET, else otsu)")
    parser.add_argument("--channel", help="threshold: which image (default: PET or the first)")
    parser.add_argument("--low", type=_finite, help="threshold range: lower bound")
    parser.add_argument("--high", type=_finite, help="threshold range: upper bound")
    parser.add_argument("--fraction", type=_fraction,
                        help="suv-fraction: of SUVmax (default 0.4)")
    parser.add_argument("--no-tta", action="store_true", help="model: no test-time flips")
    parser.add_argument("--keep-largest", action=argparse.BooleanOptionalAction,
                        help="keep each label's largest component (a model's stored clean-up "
                        "applies unless turned off with --no-keep-largest / --no-fill-holes)")
    parser.add_argument("--fill-holes", action=argparse.BooleanOptionalAction,
                        help="fill enclosed holes")
    parser.add_argument("--min-volume", type=_volume, metavar="MM3",
                        help="remove components smaller than this (mm^3)")
    parser.set_defaults(func=_run_segment)


def _run_segment(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from MultiModalAnalysisLib.errors import ConfigError
    from MultiModalAnalysisLib.io import read_mask
    from MultiModalAnalysisLib.segmentation import segment
    from MultiModalAnalysisLib.segmentation.inference import resolve_model
    from MultiModalAnalysisLib.segmentation.model_file import SegmentationModel

    unused = [option for option, given, methods in (
        ("--classes", args.classes is not None, ("gmm", "kmeans")),
        ("--model", args.model is not None, ("model",)),
        ("--no-tta", args.no_tta, ("model",)),
        ("--device", args.device is not None, ("model",)),
        ("--order-by", args.order_by is not None, ("gmm", "kmeans")),
        ("--regularisation", args.regularisation is not None, ("gmm", "kmeans")),
        *((f"--{name}", getattr(args, name) is not None, ("threshold",))
          for name in ("threshold", "channel", "low", "high", "fraction")),
    ) if given and args.method not in methods]
    if unused:
        raise ConfigError(
            f"--method {args.method} does not use {', '.join(unused)}: drop "
            f"{'it' if len(unused) == 1 else 'them'} (see mma segment --help).")
    model = resolve_model(args.model) if args.method == "model" else None
    modalities = model.modalities if isinstance(model, SegmentationModel) else None
    images = _named_images(args.images, modalities)
    options = {
        key: value for key, value in (
            ("order_by", args.order_by), ("regularisation", args.regularisation),
            ("threshold", args.threshold.replace("-", "_") if args.threshold else None),
            ("channel", args.channel), ("low", args.low), ("high", args.high),
            ("fraction", args.fraction), ("min_volume_mm3", args.min_volume),
        ) if value is not None
    }
    for key in ("keep_largest", "fill_holes"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.method == "model":
        options["tta"] = not args.no_tta
    mask = None
    if args.mask:
        from MultiModalAnalysisLib.preprocess import mask_on_grid

        # (as features and register do: onto the labels' grid, saying so when it moves)
        mask = mask_on_grid(read_mask(args.mask), next(iter(images.values())),
                            f"--mask {args.mask}", warn=True)
    with ProgressBar("segment", enabled=not args.quiet) as bar:
        result = segment(images, args.method, args.classes or 3, model=model, mask=mask,
                         device=args.device or "auto", progress=bar, **options)
    written = result.save(args.output, args.probabilities)
    counts = sitk.LabelShapeStatisticsImageFilter()
    counts.Execute(result.labels)
    for label in counts.GetLabels():
        name = result.label_names.get(label, f"label {label}")
        print(f"  label {label} ({name}): {counts.GetPhysicalSize(label) / 1000:.1f} ml")
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    return 0


def _add_train_segmentation(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-segmentation",
        help="train a segmentation network on the cases of a manifest",
        description="Train a MONAI network with one input channel per modality on a cohort "
        "manifest (CSV: case_id, one column per modality, a label column) and write the "
        "model with its metadata.",
    )
    parser.add_argument("--manifest", type=Path, required=True, help="cohort manifest CSV")
    parser.add_argument("--modalities", required=True, help="input channels, e.g. CT,PET,MR_T1")
    parser.add_argument("--label-column", required=True, help="manifest column of label maps")
    parser.add_argument("--output", "-o", type=Path, required=True,
                        help="model folder (or a .pt file)")
    parser.add_argument("--epochs", type=int, default=100, help="at most this many (100)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--iterations-per-epoch", type=int,
                        help="optimiser steps per epoch (default: one per training case)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                        help="common spacing in mm (default: median, at least 2 mm in-plane)")
    parser.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        default=(64, 64, 32), help="patch in voxels (default 64 64 32)")
    parser.add_argument("--batch-size", type=int, default=1, help="cases per step (1)")
    parser.add_argument("--patches-per-case", type=int, default=2, help="patches per case (2)")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--validation-cases", help="comma-separated case ids to validate on")
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="share of cases held out for validation when --validation-cases "
                        "is not given (0: none, train on all and keep the last epoch)")
    parser.add_argument("--patience", type=int, default=20,
                        help="stop after this many epochs without a better validation Dice "
                        "(0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="the model's name (default: the output's name)")
    parser.add_argument("--cache-dir", type=Path, help="keep prepared cases here")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes that augment the next patches during each step "
                        "(default 0; 1-3 keep a GPU busy)")
    parser.set_defaults(func=_run_train_segmentation)


def _run_train_segmentation(args: argparse.Namespace) -> int:
    from MultiModalAnalysisLib.errors import ConfigError
    from MultiModalAnalysisLib.segmentation import train_segmentation

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be 1 or more, not {args.threads}.")
        import torch

        torch.set_num_threads(args.threads)
    validation = None
    if args.validation_cases is not None:
        validation = [c.strip() for c in args.validation_cases.split(",") if c.strip()]
    with ProgressBar("train", enabled=not args.quiet) as bar:
        result = train_segmentation(
            args.manifest, [m.strip() for m in args.modalities.split(",") if m.strip()],
            args.label_column, args.output, epochs=args.epochs,
            iterations_per_epoch=args.iterations_per_epoch, spacing=args.spacing,
            patch_size=args.patch_size, batch_size=args.batch_size,
            patches_per_case=args.patches_per_case, learning_rate=args.learning_rate,
            validation_cases=validation, validation_fraction=args.validation_fraction,
            patience=args.patience or None, seed=args.seed, name=args.name,
            device=args.device, cache_dir=args.cache_dir, workers=args.workers, progress=bar,
        )
    dice = result.best_validation_dice
    print(f"trained {len(result.history)} epochs in {result.runtime_s:.0f} s; kept epoch "
          f"{result.best_epoch}" + (f" (validation Dice {dice:.3f})" if dice is not None else ""))
    print(f"wrote {result.path}")
    return 0


COMMANDS = (
    _add_demo, _add_preprocess, _add_manifest, _add_info, _add_register, _add_fuse,
    _add_segment, _add_train_segmentation, _add_features, _add_train_classifier, _add_classify,
    _add_batch,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``mma`` argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="mma",
        description="MultiModalAnalysis: multi-modal (CT/PET/MR) image analysis.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add in COMMANDS:
        add(subparsers)
    for sub in subparsers.choices.values():  # also accepted after the command
        sub.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                         help="no progress bars")
        sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="debug logging")
    return parser


OUTPUT_FILES = ("output", "probabilities")
IMAGE_OUTPUTS = {  # commands whose --output (and --probabilities) are volumes
    "segment": ("output", "probabilities"), "preprocess": ("output",), "fuse": ("output",),
}
OUTPUT_FOLDER_FILES = {  # what a command writes into --output-dir
    "register": ("warped.nii.gz", "transform.tfm", "transform.h5", "metrics.json", "qc.png"),
}
FOLDER_OUTPUTS = ("train-segmentation", "train-classifier")  # --output may be a model folder
TABLE_OUTPUTS = ("manifest", "features", "classify", "batch")  # --output is a CSV table
TABLE_SUFFIXES = (".csv", ".csv.gz")  # (pandas writes commas, whatever the name)


def _check_model_output(command: str, path: Path) -> None:
    """A model's --output: a folder (or, for a segmentation network, a .pt file), refused
    before training when it is an existing file or reads like another kind of file."""
    from MultiModalAnalysisLib.errors import ConfigError
    from MultiModalAnalysisLib.io import has_image_suffix

    single_file = command == "train-segmentation" and path.suffix.lower() in (".pt", ".pth")
    kind = "a folder" + (" (or a .pt file)" if command == "train-segmentation" else "")
    if path.is_file() and not single_file:
        raise ConfigError(f"--output {path} is a file: the model is written as {kind}; give "
                          "a new or model folder name.")
    if single_file and path.is_dir():
        raise ConfigError(f"--output {path} is a folder: give a file name ending in "
                          f"{path.suffix} or the folder without it.")
    if has_image_suffix(path) or str(path).lower().endswith(TABLE_SUFFIXES + (".json",)):
        raise ConfigError(f"--output {path} reads like an image or table file: the model is "
                          f"written as {kind}; give a folder name, e.g. {path.parent / 'model'}.")


def _refuse_overwriting_inputs(args: argparse.Namespace) -> None:
    """Inputs are never modified: an output path that names an input file, or two outputs
    that name one file, is an error before any work is done; so are an output file that is
    a folder (or an --output-dir that is a file), a volume output without an image suffix,
    a table output not ending in .csv, and an output where the system will not let us write.

    Inputs are the files named on the command line, the files a --manifest lists, every
    file of a --model folder and the images of a scanned case folder. A model folder is
    also an acceptable --output of the training commands (it is replaced)."""
    from MultiModalAnalysisLib.errors import ConfigError
    from MultiModalAnalysisLib.io import IMAGE_SUFFIXES, has_image_suffix

    command = getattr(args, "command", "")
    outputs: list[tuple[str, Path]] = []
    for name in OUTPUT_FILES:
        value = getattr(args, name, None)
        if value is None:
            continue
        if Path(value).is_dir() and command not in FOLDER_OUTPUTS:
            raise ConfigError(f"--{name} {value} is a folder: give a file name.")
        if name in IMAGE_OUTPUTS.get(command, ()) and not has_image_suffix(value):
            raise ConfigError(f"--{name} {value}: a volume is written; end the name in one "
                              f"of {', '.join(IMAGE_SUFFIXES)}.")
        if command in TABLE_OUTPUTS and name == "output" and not str(value).lower().endswith(
                TABLE_SUFFIXES):
            raise ConfigError(f"--output {value}: a table is written; end the name in .csv.")
        outputs.append((f"--{name}", Path(value)))
        if name == "probabilities":  # (segment imports the segmentation engine anyway)
            from MultiModalAnalysisLib.segmentation.result import uncertainty_path

            outputs.append(("the uncertainty map of --probabilities", uncertainty_path(value)))
    folder = getattr(args, "output_dir", None)
    if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
        raise ConfigError(f"--output-dir {folder} is a file: give a folder.")
    for file_name in OUTPUT_FOLDER_FILES.get(command, ()):
        outputs.append((f"--output-dir's {file_name}", Path(folder) / file_name))
    inputs: dict[Path, str] = {}
    folders: list[tuple[Path, str, bool]] = []  # (input folder, argument, all its files)
    for name, value in vars(args).items():
        if name in OUTPUT_FILES or name in ("output_dir", "func", "command", "argv"):
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str | Path):
                text = str(item)
                path = Path(text.partition("=")[2] if "=" in text else text)
                if path.is_file():
                    inputs[path.resolve()] = text
                    if name == "manifest":
                        inputs.update(_files_listed_in(path))
                elif path.is_dir() and name in ("model", "folder"):
                    # a model folder is read whole; a scanned cohort folder, for its images
                    folders.append((path.resolve(), text, name == "model"))
    # (a hard link to an input is the input: the same file under another name)
    identities = {_identity(path): text for path, text in inputs.items()}
    seen: dict[Path, str] = {}
    probed: set[Path] = set()
    for label, path in outputs:
        resolved = path.resolve()
        if resolved not in inputs and resolved.is_file():
            for folder, text, whole in folders:
                # a scanned cohort folder's images, and any other file there but a manifest
                # written before (an outcomes table, a README: data, not outputs)
                if resolved.is_relative_to(folder) and (
                        whole or has_image_suffix(resolved) or not _is_manifest(resolved)):
                    inputs[resolved] = f"in {text}"
            if resolved not in inputs and _identity(resolved) in identities:
                inputs[resolved] = f"the same file as {identities[_identity(resolved)]}"
        if resolved in inputs:
            raise ConfigError(f"{label} {path} is also an input ({inputs[resolved]}): inputs "
                              "are never overwritten; write to another file.")
        if resolved in seen:
            raise ConfigError(f"{label} and {seen[resolved]} name the same file ({path}).")
        seen[resolved] = label
        if resolved.parent not in probed:  # (register's five files share one folder)
            _check_writable(resolved.parent, label, path)
            probed.add(resolved.parent)
    if command in FOLDER_OUTPUTS and getattr(args, "output", None) is not None:
        _check_model_output(command, Path(args.output))
        model_folder = Path(args.output).resolve()
        inside = sorted(str(text) for path, text in inputs.items()
                        if path.is_relative_to(model_folder))
        if inside:
            raise ConfigError(f"--output {args.output}: the model folder holds an input "
                              f"({', '.join(inside)}), and its files are replaced: write the "
                              "model elsewhere, or move the input out.")


def _identity(path: Path) -> tuple[int, int] | None:
    """The file's device and inode (``None`` when it does not exist)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _is_manifest(path: Path) -> bool:
    """Whether ``path`` reads as a manifest ``mma manifest`` wrote: a ``case_id`` column
    and image path columns (an outcomes table headed ``case_id`` has none)."""
    from MultiModalAnalysisLib.case import read_manifest
    from MultiModalAnalysisLib.classification.table import image_path_columns
    from MultiModalAnalysisLib.errors import MMAError

    try:
        return bool(image_path_columns(read_manifest(path).table))
    except (MMAError, OSError, UnicodeDecodeError, ValueError):
        return False


def _check_writable(folder: Path, label: str, path: Path) -> None:
    """Refuse, before any work, an output whose folder (or the closest existing folder
    above it, where it is still to be made) the system will not let us write into."""
    import tempfile

    from MultiModalAnalysisLib.errors import ConfigError

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{label} {path}: {existing} is a file, not a folder.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ConfigError(f"{label} {path}: cannot write into {existing} "
                          f"({error.strerror or error}); choose another place.") from None


def _files_listed_in(manifest: Path) -> dict[Path, str]:
    """The existing files a manifest (CSV) names (``Manifest.resolve``: relative paths
    against its folder); a manifest that cannot be read names none here (the command itself
    then says what is wrong)."""
    from pandas.api.types import is_numeric_dtype

    from MultiModalAnalysisLib.case import read_manifest
    from MultiModalAnalysisLib.errors import MMAError

    try:
        cohort = read_manifest(manifest)
    except MMAError:
        return {}
    listed: dict[Path, str] = {}
    for column in cohort.table.columns:
        if is_numeric_dtype(cohort.table[column]):  # numbers: no paths
            continue
        for value in cohort.table[column].dropna():
            text = str(value).strip()
            if text and (path := cohort.resolve(text)).is_file():
                listed[path.resolve()] = f"listed in {manifest}"
    return listed


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mma`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s: %(message)s",
    )
    from MultiModalAnalysisLib.errors import MMAWarning

    try:
        _refuse_overwriting_inputs(args)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=MMAWarning)  # in the log already
            return int(args.func(args) or 0)
    except OperationCancelled as error:
        print(f"mma: cancelled: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("mma: interrupted", file=sys.stderr)
        return 130
    except MMAError as error:
        print(f"mma {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path the system refuses (permissions, a full disk...)
        log.debug("the system's error", exc_info=True)  # shown with -v
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        print(f"mma {args.command}: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
