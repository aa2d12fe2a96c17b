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
                        help="an image and its name (repeat for several: CT=ct.nii.gz)")
    single.add_argument("--mask", type=Path, help="the region of interest")
    single.add_argument("--case-id", help="the case's id in the table (default: the mask's "
                        "folder name)")
    cohort = parser.add_argument_group("a cohort")
    cohort.add_argument("--manifest", type=Path, help="cohort manifest CSV (one row per case)")
    cohort.add_argument("--mask-column", help="the manifest column holding each case's mask")
    cohort.add_argument("--modalities", help="comma-separated image columns, e.g. CT,PET,MR_T1")
    parser.add_argument("--output", "-o", type=Path, required=True, help="features CSV")
    parser.add_argument("--settings", type=Path,
                        help="JSON or YAML file of IBSI settings (see FeatureSettings)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.set_defaults(func=_run_features)


def _run_features(args: argparse.Namespace) -> int:
    import pandas as pd

    from MultiModalAnalysisLib.errors import ConfigError
    from MultiModalAnalysisLib.features import (
        extract_cohort_features,
        extract_features,
        load_settings,
    )
    from MultiModalAnalysisLib.io import read_image

    settings = load_settings(args.settings)
    if args.manifest:
        if args.image or args.mask:
            raise ConfigError("give either --manifest or --image/--mask, not both.")
        if not args.mask_column or not args.modalities:
            raise ConfigError("--manifest needs --mask-column and --modalities (e.g. CT,PET).")
        modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
        with ProgressBar("features", enabled=not args.quiet) as bar:
            table = extract_cohort_features(
                args.manifest, modalities, args.mask_column, settings, args.device, bar
            )
    else:
        if not args.image or not args.mask:
            raise ConfigError(
                "give --image NAME=PATH (one or more) and --mask, or --manifest with "
                "--mask-column and --modalities."
            )
        images = {}
        for item in args.image:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--image {item!r}: write NAME=PATH, e.g. CT=ct.nii.gz.")
            images[name] = read_image(path, name=f"{name} ({path})")
        mask = read_image(args.mask, name=f"mask {args.mask}")
        with ProgressBar("features", enabled=not args.quiet) as bar:
            values = extract_features(images, mask, settings, args.device, bar)
        case_id = args.case_id or args.mask.resolve().parent.name
        table = pd.DataFrame([{"case_id": case_id, **values}])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.output, index=False)
    print(f"wrote {args.output}: {len(table)} case(s), {table.shape[1] - 1} features each")
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


COMMANDS = (_add_demo, _add_preprocess, _add_manifest, _add_features, _add_info)


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
