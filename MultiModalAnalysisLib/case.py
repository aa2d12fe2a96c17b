"""A ``Case``: one patient's named modality images, masks and metadata, and the two ways to
load one: from a folder laid out like ``STS_xxx/`` (``CT_image.nii.gz``, ``CT_mask.nii.gz``,
...) and from a row of a cohort manifest (CSV: ``case_id``, one column per modality holding
an image path, optional mask columns; relative paths resolve against the CSV's folder).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as _replace_fields
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from MultiModalAnalysisLib.errors import LabelError, ManifestError, MissingModalityError
from MultiModalAnalysisLib.images import NanPolicy
from MultiModalAnalysisLib.io import IMAGE_SUFFIXES, read_image
from MultiModalAnalysisLib.modalities import FAMILIES, canonical_modality

log = logging.getLogger(__name__)

MASK_WORDS = ("mask", "label", "seg", "gtv", "roi")

# How many column names an error message lists: a feature table has about a thousand.
SHOWN_COLUMNS = 20


def column_list(columns: Iterable[Any], limit: int = SHOWN_COLUMNS) -> str:
    """The first ``limit`` column names, comma-separated, then how many more there are."""
    names = [str(c) for c in columns]
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def column_modality(column: Any) -> str:
    """The canonical modality a manifest's image column is named after (``CT``,
    ``CT_image``, ``ct`` -> ``CT``)."""
    name = str(column)
    return canonical_modality(name[: -len("_image")] if name.lower().endswith("_image")
                              else name)


@dataclass
class Case:
    """One patient: modality images (by canonical name), masks (by name) and metadata.

    ``images`` and ``masks`` hold ``SimpleITK.Image`` objects; steps return new cases via
    :meth:`replace` rather than modifying one.
    """

    case_id: str
    images: dict[str, sitk.Image] = field(default_factory=dict)
    masks: dict[str, sitk.Image] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def modalities(self) -> list[str]:
        """The modality names of the images, in insertion order."""
        return list(self.images)

    def image(self, modality: str) -> sitk.Image:
        """The image of ``modality`` (any spelling: ``mr-t1`` finds ``MR_T1``)."""
        key = canonical_modality(modality)
        if key not in self.images:
            raise MissingModalityError(
                f"case {self.case_id} has no {key} image (it has: "
                f"{', '.join(self.images) or 'none'}). Add the {key} volume or choose another "
                "modality."
            )
        return self.images[key]

    def mask(self, name: str | None = None) -> sitk.Image:
        """A mask by name; without a name, the first of ``mask``, ``CT_mask``, or any mask."""
        if name is None:
            for candidate in ("mask", "CT_mask", *self.masks):
                if candidate in self.masks:
                    return self.masks[candidate]
        elif name in self.masks:
            return self.masks[name]
        raise MissingModalityError(
            f"case {self.case_id} has no mask{f' named {name}' if name else ''} (masks: "
            f"{', '.join(self.masks) or 'none'}). Provide a mask or segment the case first."
        )

    def require(self, modalities: Iterable[str]) -> None:
        """Raise :class:`MissingModalityError` naming every missing modality."""
        missing = [m for m in map(canonical_modality, modalities) if m not in self.images]
        if missing:
            raise MissingModalityError(
                f"case {self.case_id} lacks {', '.join(missing)} (it has: "
                f"{', '.join(self.images) or 'none'})."
            )

    def replace(self, **changes: Any) -> Case:
        """A new case with some fields replaced; dictionaries are copied, images shared."""
        new = _replace_fields(self, **changes)
        new.images = dict(new.images)
        new.masks = dict(new.masks)
        new.metadata = dict(new.metadata)
        new.sources = dict(new.sources)
        return new


def read_label_image(path: str | Path, *, name: str | None = None) -> sitk.Image:
    """Read a label map (mask or multi-label segmentation) as an unsigned integer image.

    Raises:
        LabelError: non-integer or negative values.
    """
    label = name or str(path)
    image = read_image(path, name=label)
    values = np.unique(sitk.GetArrayViewFromImage(image))
    if np.any(np.mod(values, 1) != 0) or values.min() < 0:
        raise LabelError(
            f"{label} is not a label map: it holds negative or non-integer values (e.g. "
            f"{values[:5].tolist()}). Give a mask or segmentation file, not an intensity image."
        )
    pixel = sitk.sitkUInt8 if values.max() < 256 else sitk.sitkUInt16
    return sitk.Cast(image, pixel)


def _strip_suffix(filename: str) -> str | None:
    lower = filename.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return filename[: -len(suffix)]
    return None


def _classify_file(stem: str) -> tuple[str, str] | None:
    """(``"image"``, modality) or (``"mask"``, mask name) for a file stem, or None."""
    lower = stem.lower()
    if lower.endswith("_image"):
        return "image", canonical_modality(stem[: -len("_image")])
    if any(lower.endswith("_" + word) or lower == word for word in MASK_WORDS):
        return "mask", stem
    whole = canonical_modality(stem)
    if whole in FAMILIES:
        return "image", whole
    last = canonical_modality(re.split(r"[-_]", stem)[-1])
    if last in FAMILIES:
        return "image", last
    return None


def load_case(
    folder: str | Path,
    modalities: Sequence[str] | None = None,
    *,
    case_id: str | None = None,
    with_masks: bool = True,
    nan_policy: NanPolicy = "error",
) -> Case:
    """Load a case from a folder of volumes.

    Files named ``<MODALITY>_image.<ext>`` are images and ``<NAME>_mask.<ext>`` masks (the
    STS layout); a file named after a modality (``CT.nii.gz``, ``...-t1c.nii.gz``) is also an
    image.

    Args:
        folder: the case folder.
        modalities: load only these (and fail if one is missing); all found by default.
        case_id: defaults to the folder name.
        with_masks: also load the masks.
        nan_policy: see ``images.validate_image``.

    Raises:
        MissingModalityError: a requested modality has no file, or no image was found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingModalityError(f"{folder} is not a folder: give the folder of one case.")
    wanted = [canonical_modality(m) for m in modalities] if modalities else None
    case = Case(case_id or folder.name)
    for path in sorted(folder.iterdir()):
        stem = _strip_suffix(path.name)
        kind = _classify_file(stem) if stem else None
        if kind is None:
            continue
        role, key = kind
        if role == "image" and (wanted is None or key in wanted) and key not in case.images:
            case.images[key] = read_image(path, name=str(path), nan_policy=nan_policy)
            case.sources[key] = str(path)
        elif role == "mask" and with_masks:
            case.masks[key] = read_label_image(path)
            case.sources[key] = str(path)
    if wanted:
        missing = [m for m in wanted if m not in case.images]
        if missing:
            raise MissingModalityError(
                f"{folder} has no image for {', '.join(missing)}; expected files like "
                f"{missing[0]}_image.nii.gz (found: "
                f"{', '.join(p.name for p in sorted(folder.iterdir())) or 'nothing'})."
            )
    if not case.images:
        raise MissingModalityError(
            f"{folder} holds no recognisable image (expected e.g. CT_image.nii.gz, "
            "PET_image.nii.gz, MR_T1_image.nii.gz)."
        )
    return case


@dataclass
class Manifest:
    """A cohort manifest: one row per case (``case_id``, image paths, masks, outcomes)."""

    path: Path
    table: Any  # pandas.DataFrame, indexed by position, with a string ``case_id`` column

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def case_ids(self) -> list[str]:
        return self.table["case_id"].tolist()

    def __len__(self) -> int:
        return len(self.table)

    def modality_column(self, modality: str) -> str:
        """The column holding ``modality``'s image paths (``CT``, ``CT_image``, ``ct`` ...)."""
        key = canonical_modality(modality)
        for column in self.table.columns:
            if column_modality(column) == key:
                return str(column)
        raise ManifestError(
            f"{self.path} has no column for modality {key} (columns: "
            f"{column_list(self.table.columns)})."
        )

    def column(self, name: str) -> str:
        """A column by exact name, or a clear error listing the columns."""
        if name not in self.table.columns:
            raise ManifestError(
                f"{self.path} has no column '{name}' (columns: "
                f"{column_list(self.table.columns)})."
            )
        return name

    def resolve(self, value: str) -> Path:
        """A path from the manifest, relative paths taken from the CSV's folder."""
        path = Path(str(value)).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def row(self, case_id: str) -> dict[str, Any]:
        rows = self.table[self.table["case_id"] == str(case_id)]
        if rows.empty:
            raise ManifestError(f"{self.path} has no case '{case_id}'.")
        return rows.iloc[0].to_dict()

    def load_case(
        self,
        case_id: str,
        modalities: Sequence[str],
        mask_columns: Sequence[str] = (),
        *,
        nan_policy: NanPolicy = "error",
    ) -> Case:
        """Load one row's images (``modalities``) and masks; other columns become metadata."""
        row = self.row(case_id)
        case = Case(str(case_id))
        used = set()
        for modality in modalities:
            column = self.modality_column(modality)
            used.add(column)
            value = row[column]
            if _is_missing(value):
                raise MissingModalityError(
                    f"case {case_id} in {self.path} has no {canonical_modality(modality)} path "
                    f"(column '{column}' is empty)."
                )
            path = self.resolve(value)
            key = canonical_modality(modality)
            case.images[key] = read_image(
                path, name=f"{key} of case {case_id} ({path})", nan_policy=nan_policy
            )
            case.sources[key] = str(path)
        for column in mask_columns:
            column = self.column(column)
            used.add(column)
            value = row[column]
            if _is_missing(value):
                raise MissingModalityError(
                    f"case {case_id} in {self.path} has no mask (column '{column}' is empty)."
                )
            path = self.resolve(value)
            case.masks[column] = read_label_image(path, name=f"{column} of case {case_id}")
            case.sources[column] = str(path)
        case.metadata = {
            k: v for k, v in row.items() if k not in used and k != "case_id" and not _is_missing(v)
        }
        return case

    def iter_cases(
        self, modalities: Sequence[str], mask_columns: Sequence[str] = (), **options: Any
    ) -> Iterator[Case]:
        """Load the cases one at a time, in manifest order."""
        for case_id in self.case_ids:
            yield self.load_case(case_id, modalities, mask_columns, **options)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value) == ""


def read_manifest(path: str | Path) -> Manifest:
    """Read a cohort manifest CSV.

    Raises:
        ManifestError: unreadable file, no ``case_id`` column, or duplicate case ids.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist.")
    try:
        table = pd.read_csv(path, dtype={"case_id": str})
    except Exception as error:  # pandas raises many types for malformed CSV
        raise ManifestError(f"manifest {path} could not be read as CSV: {error}") from None
    if "case_id" not in table.columns:
        raise ManifestError(
            f"manifest {path} has no 'case_id' column (columns: "
            f"{column_list(table.columns)}). Name the patient-id column case_id."
        )
    blank = [i + 2 for i, v in enumerate(table["case_id"]) if pd.isna(v) or not str(v).strip()]
    if blank:  # (row numbers as a spreadsheet shows them: the header is row 1)
        raise ManifestError(
            f"manifest {path} has no case_id on row(s) {', '.join(map(str, blank[:10]))}"
            f"{', ...' if len(blank) > 10 else ''}: give every case an id.")
    table["case_id"] = table["case_id"].astype(str).str.strip()
    duplicated = table["case_id"][table["case_id"].duplicated()].tolist()
    if duplicated:
        raise ManifestError(f"manifest {path} lists cases more than once: {duplicated}.")
    # (where its relative paths start: a DICOM folder, which has no image suffix, is
    # recognised as an image path by being a folder there; see image_path_columns)
    table.attrs["base_dir"] = str(path.resolve().parent)
    return Manifest(path.resolve(), table)


def manifest_from_folder(
    folder: str | Path, outcomes: str | Path | None = None, *, relative_to: str | Path | None = None
):
    """Build a manifest table from a cohort folder laid out like ``sts/STS_xxx/``.

    Args:
        folder: holds one sub-folder per case.
        outcomes: optional CSV whose first column is the case id (e.g. ``PatientID``) and
            whose other columns (e.g. ``LungMets``) are joined in.
        relative_to: write paths relative to this folder (where the manifest will live);
            absolute paths otherwise.

    Returns:
        A pandas DataFrame with ``case_id``, one ``<MODALITY>`` column per image and one
        column per mask name.
    """
    import pandas as pd

    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(
            f"{folder} is not a folder{'' if folder.exists() else ' (it does not exist)'}: give "
            "the cohort folder that holds one sub-folder per case (e.g. ../shared/data/sts)."
        )
    rows = []
    for case_dir in sorted(p for p in folder.iterdir()
                           if p.is_dir() and not p.name.startswith((".", "__"))):
        row: dict[str, Any] = {"case_id": case_dir.name}
        found: dict[str, Path] = {}
        for path in sorted(case_dir.iterdir()):
            stem = _strip_suffix(path.name)
            kind = _classify_file(stem) if stem else None
            if kind is None:
                continue
            if kind[1] in found:
                raise ManifestError(
                    f"case {case_dir.name} has two files for the column {kind[1]}: "
                    f"{found[kind[1]].name} and {path.name}. Keep one (or rename the other so "
                    "that its name does not read as that modality or mask).")
            found[kind[1]] = path
            value = path.resolve()
            if relative_to is not None:
                value = Path(_relpath(value, Path(relative_to).resolve()))
            row[kind[1]] = str(value)
        if len(row) > 1:
            rows.append(row)
    if not rows:
        raise ManifestError(f"{folder} holds no case folders with images.")
    table = pd.DataFrame(rows)
    if outcomes is not None:
        if not Path(outcomes).is_file():
            raise ManifestError(f"the outcomes file {outcomes} does not exist (a CSV whose "
                                "first column is the case id).")
        table = _join_outcomes(table, Path(outcomes))
    return table


def _join_outcomes(table, outcomes: Path):
    """``table`` with the outcome columns joined by case id, checked: the delimiter is
    sniffed (comma, semicolon, tab), integer outcomes stay integers where some cases have
    none, and a join that matches few or no cases is said (an id mismatch such as ``1``
    against ``STS_001`` would otherwise give an empty outcome column)."""
    import pandas as pd

    try:
        # the ids as written (a folder 001 must match 001, not 1)
        extra = pd.read_csv(outcomes, sep=None, engine="python", encoding="utf-8",
                            converters={0: str})
    except (ValueError, OSError, pd.errors.ParserError) as error:
        raise ManifestError(f"cannot read the outcomes file {outcomes}: {error}") from error
    if extra.shape[1] < 2:
        raise ManifestError(f"the outcomes file {outcomes} has no outcome column (a CSV with "
                            "the case id first, then e.g. LungMets).")
    extra = extra.rename(columns={extra.columns[0]: "case_id"})
    extra["case_id"] = extra["case_id"].astype(str).str.strip()
    twice = sorted(set(extra.loc[extra["case_id"].duplicated(), "case_id"]))
    if twice:
        raise ManifestError(
            f"the outcomes file {outcomes} has more than one row for case(s) "
            f"{', '.join(twice[:5])}{', ...' if len(twice) > 5 else ''}: keep one row per case."
        )
    clash = sorted(set(extra.columns[1:]) & set(table.columns))
    if clash:
        raise ManifestError(f"the outcomes file {outcomes} has columns named like the "
                            f"manifest's own ({', '.join(clash)}); rename them.")
    known = set(table["case_id"])
    matched = sum(case_id in known for case_id in extra["case_id"])
    if matched == 0:
        raise ManifestError(
            f"no case id of the outcomes file {outcomes} (e.g. "
            f"{', '.join(extra['case_id'].head(3))}) names a case folder (e.g. "
            f"{', '.join(table['case_id'].head(3))}): the first column must hold the folder "
            "names.")
    missing = sorted(known - set(extra["case_id"]))
    if missing:
        log.warning("%d of %d cases have no row in %s (%s%s): their outcomes are empty.",
                    len(missing), len(known), outcomes, ", ".join(missing[:5]),
                    ", ..." if len(missing) > 5 else "")
    merged = table.merge(extra, on="case_id", how="left")
    for column in extra.columns[1:]:
        if pd.api.types.is_integer_dtype(extra[column]) and merged[column].isna().any():
            merged[column] = merged[column].astype("Int64")  # 1 and 0, not 1.0 and 0.0
    return merged


def _relpath(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path, start)
