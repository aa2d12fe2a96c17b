"""The ``mma`` command line (see DESIGN.md for the stable contract).

Each sub-command is a pair: ``_add_<name>(subparsers)`` declares its arguments and sets
``func`` to ``_run_<name>(args) -> int``. Errors a user can cause (``MMAError``) are printed
as one line without a traceback, with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from MultiModalAnalysisLib import __version__
from MultiModalAnalysisLib.errors import MMAError, OperationCancelled


class ProgressBar:
    """A tqdm bar driven by ``progress(fraction, message)`` callbacks."""

    def __init__(self, description: str, enabled: bool = True) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=1000,
            desc=description,
            disable=not enabled,
            leave=False,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}",
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
        description="Load the bundled sample patient (CT, PET, MR-T1), preprocess it, bring "
        "every modality onto the CT grid and write the volumes and a PNG montage.",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("mma-demo-output"),
                        help="where to write the outputs (default: ./mma-demo-output)")
    parser.add_argument("--case-dir", type=Path, default=None,
                        help="run on another case folder in the STS layout instead")
    parser.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from MultiModalAnalysisLib.demo import run_demo

    print(f"mma demo: writing to {args.output_dir.resolve()}")
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
    from MultiModalAnalysisLib.io import read_image, read_mask, write_image
    from MultiModalAnalysisLib.preprocess import (
        apply_modality_preset,
        resample_to_reference,
        resample_to_spacing,
    )

    image = read_image(args.image)
    mask = read_mask(args.mask, reference=image) if args.mask else None
    with ProgressBar("preprocess", enabled=not args.quiet) as bar:
        result = apply_modality_preset(image, args.modality, mask=mask, progress=bar)
    if args.reference:
        result = resample_to_reference(result, read_image(args.reference), name=str(args.image))
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


def _image_argument(value: str) -> tuple[str | None, Path]:
    """``NAME=PATH`` -> (NAME, PATH); a bare path -> (its modality from the file name, PATH)."""
    from MultiModalAnalysisLib.case import _classify_file, _strip_suffix

    name, sep, path = value.partition("=")
    if sep and name and not Path(value).exists():
        return name, Path(path)
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
    from MultiModalAnalysisLib.io import read_image

    parsed = [_image_argument(a) for a in arguments]
    if model_modalities and any(name is None for name, _ in parsed):
        if len(parsed) != len(model_modalities):
            raise ConfigError(
                f"the model takes {len(model_modalities)} images ({', '.join(model_modalities)})"
                f" but {len(parsed)} were given: give one per modality, e.g. "
                + " ".join(f"{m}=..." for m in model_modalities) + "."
            )
        parsed = [(name or model_modalities[i], path) for i, (name, path) in enumerate(parsed)]
    images = {}
    for i, (name, path) in enumerate(parsed):
        key = name or f"image{i + 1}"
        if key in images:
            raise ConfigError(f"two images are named {key}: name them NAME=PATH.")
        images[key] = read_image(path, name=f"{key} ({path})")
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
    parser.add_argument("--classes", type=int, default=3, help="gmm/kmeans classes (default 3)")
    parser.add_argument("--model", type=Path, help="model file/folder or MONAI bundle folder")
    parser.add_argument("--mask", type=Path, help="segment inside this region only")
    parser.add_argument("--output", "-o", type=Path, required=True, help="label map to write")
    parser.add_argument("--probabilities", type=Path,
                        help="write per-label probabilities here (a vector image) and the "
                        "uncertainty map next to it as <name>_uncertainty.nii.gz")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--order-by", help="gmm/kmeans: order classes by this image's mean")
    parser.add_argument("--regularisation", choices=["icm", "smoothing", "none"],
                        help="gmm/kmeans spatial regularisation (default icm)")
    parser.add_argument("--threshold", choices=["otsu", "range", "suv-fraction"],
                        help="threshold kind (default: suv-fraction on PET, else otsu)")
    parser.add_argument("--channel", help="threshold: which image (default: PET or the first)")
    parser.add_argument("--low", type=float, help="threshold range: lower bound")
    parser.add_argument("--high", type=float, help="threshold range: upper bound")
    parser.add_argument("--fraction", type=float, help="suv-fraction: of SUVmax (default 0.4)")
    parser.add_argument("--no-tta", action="store_true", help="model: no test-time flips")
    parser.add_argument("--keep-largest", action="store_true", help="keep each label's largest "
                        "component")
    parser.add_argument("--fill-holes", action="store_true", help="fill enclosed holes")
    parser.add_argument("--min-volume", type=float, metavar="MM3",
                        help="remove components smaller than this (mm^3)")
    parser.set_defaults(func=_run_segment)


def _run_segment(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from MultiModalAnalysisLib.io import read_mask
    from MultiModalAnalysisLib.segmentation import segment
    from MultiModalAnalysisLib.segmentation.inference import resolve_model
    from MultiModalAnalysisLib.segmentation.model_file import SegmentationModel

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
    if args.keep_largest:
        options["keep_largest"] = True
    if args.fill_holes:
        options["fill_holes"] = True
    if args.method == "model":
        options["tta"] = not args.no_tta
    mask = read_mask(args.mask) if args.mask else None
    with ProgressBar("segment", enabled=not args.quiet) as bar:
        result = segment(images, args.method, args.classes, model=model, mask=mask,
                         device=args.device, progress=bar, **options)
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
    parser.set_defaults(func=_run_train_segmentation)


def _run_train_segmentation(args: argparse.Namespace) -> int:
    from MultiModalAnalysisLib.segmentation import train_segmentation

    if args.threads:
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
            device=args.device, cache_dir=args.cache_dir, progress=bar,
        )
    dice = result.best_validation_dice
    print(f"trained {len(result.history)} epochs in {result.runtime_s:.0f} s; kept epoch "
          f"{result.best_epoch}" + (f" (validation Dice {dice:.3f})" if dice is not None else ""))
    print(f"wrote {result.path}")
    return 0


COMMANDS = (
    _add_demo, _add_preprocess, _add_manifest, _add_info, _add_segment, _add_train_segmentation,
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mma`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s: %(message)s",
    )
    try:
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
