"""Reading and writing volumes: NIfTI, NRRD, MHA files and DICOM series.

Every reader validates what it loads (3-D scalar, finite values, non-empty) and raises the
project's errors naming the file.
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from MultiModalAnalysisLib.errors import ImageReadError, MMAError
from MultiModalAnalysisLib.images import (
    NanPolicy,
    image_from_array,
    validate_image,
    validate_mask,
)
from MultiModalAnalysisLib.modalities import modality_family

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def has_image_suffix(path: str | Path) -> bool:
    """True when the file name ends in a volume format this project reads and writes."""
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def read_image(
    path: str | Path,
    *,
    name: str | None = None,
    nan_policy: NanPolicy = "error",
    require_contrast: bool = False,
    series_uid: str | None = None,
    modality: str | None = None,
) -> sitk.Image:
    """Read a 3-D volume from a NIfTI/NRRD/MHA file or a DICOM series folder.

    Args:
        path: a file, or a folder holding a DICOM series.
        name: how to call the image in messages (defaults to the path).
        nan_policy: what to do with NaN/Inf voxels (see ``images.validate_image``).
        require_contrast: refuse a constant image.
        series_uid: for a DICOM folder, the series to read (default: see
            :func:`read_dicom_series`).
        modality: the modality expected (``CT``, ``PET``, ``MR_T1``...): of several DICOM
            series in a folder, one of that modality is read.

    Raises:
        ImageReadError: missing or unreadable path.
        ImageDimensionError, NonFiniteImageError, EmptyImageError, ConstantImageError.
    """
    path = Path(path)
    label = name or str(path)
    if not path.exists():
        where = "" if str(path) in label else f" ({path})"
        raise ImageReadError(f"{label}: no such file or folder{where}. Check the path.")
    if path.is_dir():
        image = read_dicom_series(path, series_uid=series_uid, name=label, modality=modality)
    else:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            raise ImageReadError(
                f"{label} could not be read as an image ({_first_line(error)}). Supported: "
                f"{', '.join(IMAGE_SUFFIXES)} files and DICOM series folders."
            ) from None
        _check_nifti_complete(path, label)
        image = _restore_nifti_non_finite(path, image)
    return validate_image(image, label, require_contrast=require_contrast, nan_policy=nan_policy)


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI-1 datatype codes of float32 / float64


@dataclass(frozen=True)
class _Nifti1Header:
    order: str  # byte order, "<" or ">"
    datatype: int
    bits: int  # per voxel
    count: int  # voxels
    offset: int  # where the voxels start


def _nifti_open(path: Path):
    import gzip

    return (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb")


def _nifti1_header(path: Path) -> _Nifti1Header | None:
    """The fields of a NIfTI-1 header the checks of this module read; ``None`` for another
    format or a header with impossible dimensions (left to ITK).

    Raises:
        EOFError: the file ends inside the header.
    """
    import zlib

    import numpy as np

    try:
        with _nifti_open(path) as stream:
            header = stream.read(348)
    except (OSError, zlib.error):
        header = b""
    if len(header) < 348:
        raise EOFError(path)
    order = "<" if np.frombuffer(header[:4], "<i4")[0] == 348 else ">"
    if np.frombuffer(header[:4], order + "i4")[0] != 348:
        return None
    dims = np.frombuffer(header[40:56], order + "i2").astype(np.int64)
    if not 1 <= dims[0] <= 7 or (dims[1 : 1 + dims[0]] < 0).any():
        return None
    return _Nifti1Header(
        order=order,
        datatype=int(np.frombuffer(header[70:72], order + "i2")[0]),
        bits=int(np.frombuffer(header[72:74], order + "i2")[0]),
        count=int(np.prod(dims[1 : 1 + dims[0]])),
        offset=int(np.frombuffer(header[108:112], order + "f4")[0]),
    )


def _check_nifti_complete(path: Path, label: str) -> None:
    """Refuse a NIfTI-1 file shorter than its header says: ITK reads a truncated .nii.gz
    without a word and fills the missing voxels with 0 (half a volume of zeros, which looks
    like an image). The gzip trailer's length is checked first (no decompression); only
    when it disagrees (a truncated file, or a file of several gzip members) is the data
    decompressed and counted."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    compressed = name.endswith(".gz")
    try:
        header = _nifti1_header(path)
    except EOFError:
        raise ImageReadError(f"{label} is truncated: it ends inside the NIfTI header.") from None
    if header is None or header.bits <= 0:
        return  # not NIfTI-1, or a header ITK will judge
    expected = max(header.offset, 348) + header.count * header.bits // 8
    if not compressed:
        length = path.stat().st_size
    else:
        with open(path, "rb") as raw:
            raw.seek(-4, 2)
            trailer = int.from_bytes(raw.read(4), "little")
        if trailer == expected % 2**32:
            return
        length = _gunzipped_length(path)
    if length < expected:
        raise ImageReadError(
            f"{label} is truncated: its header announces {expected} bytes of NIfTI data, "
            f"the file holds {'about ' if compressed else ''}{length} "
            f"({100.0 * length / expected:.0f} %). Copy or download it again.")


def _gunzipped_length(path: Path) -> int:
    """How many bytes a gzip file decompresses to, every member counted; a truncated or
    damaged file counts what could be decompressed (``gzip.open`` would drop the last
    block read before the end, so a short file read as 0 bytes)."""
    length = 0
    stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(path, "rb") as raw:
        while chunk := raw.read(1 << 16):
            while chunk:
                try:
                    length += len(stream.decompress(chunk))
                except zlib.error:
                    return length  # damaged: what was read is what there is
                if not stream.eof:
                    break
                chunk = stream.unused_data  # the next gzip member
                stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
    return length


def _restore_nifti_non_finite(path: Path, image: sitk.Image) -> sitk.Image:
    """``image`` with the NaN/Inf voxels of a floating-point NIfTI-1 file put back.

    ITK's NIfTI reader turns NaN into 0, which would let a corrupt PET through as a
    plausible image; so for float NIfTI files holding zeros the stored values are checked
    directly (the file is read a second time: a few tens of ms for a PET volume). Other
    formats, integer files and images without a 0 voxel are returned as they are.
    """
    import numpy as np

    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")) or image.GetNumberOfComponentsPerPixel() != 1:
        return image
    if not np.any(sitk.GetArrayViewFromImage(image) == 0):
        return image  # no voxel could have been a NaN turned into 0
    try:
        header = _nifti1_header(path)
        if header is None or header.datatype not in _NIFTI_FLOATS:
            return image  # not NIfTI-1 (NIfTI-2 and others: as read), or not floats
        with _nifti_open(path) as stream:
            stream.read(max(header.offset, 348))
            raw = np.frombuffer(stream.read(), header.order + _NIFTI_FLOATS[header.datatype],
                                header.count)
    except (OSError, ValueError, EOFError):
        return image  # SimpleITK read it; leave any oddity of the file to it
    bad = ~np.isfinite(raw)
    if not bad.any():
        return image
    array = sitk.GetArrayFromImage(image)
    if array.size != raw.size or not np.issubdtype(array.dtype, np.floating):
        return image
    flat = array.reshape(-1)
    flat[bad] = raw[bad]
    restored = image_from_array(flat.reshape(array.shape), image)
    for key in image.GetMetaDataKeys():
        restored.SetMetaData(key, image.GetMetaData(key))
    return restored


def read_mask(
    path: str | Path, *, name: str | None = None, reference: sitk.Image | None = None
) -> sitk.Image:
    """Read a binary mask (returned as UInt8 0/1); see ``images.validate_mask``."""
    label = name or str(path)
    image = read_image(path, name=label)
    return validate_mask(image, label, reference=reference)


def write_image(image: sitk.Image, path: str | Path, *, compress: bool = True) -> Path:
    """Write a volume to ``path`` (format from the suffix), creating parent folders.

    Returns:
        The path written.
    """
    path = Path(path)
    if not has_image_suffix(path):
        raise MMAError(
            f"cannot write {path}: use one of the suffixes {', '.join(IMAGE_SUFFIXES)}."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sitk.WriteImage(image, str(path), compress)
    except RuntimeError as error:
        raise MMAError(f"could not write {path}: {_first_line(error)}") from None
    return path


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder."""

    uid: str
    files: tuple[str, ...]
    description: str = ""
    modality: str = ""

    @property
    def n_slices(self) -> int:
        return len(self.files)


@contextlib.contextmanager
def staged_writes(folder: str | Path, name: str):
    """A fresh folder ``folder/.partial-<name>`` to write a set of outputs into, moved into
    ``folder`` together by :func:`publish_staged` once all are written. When the block
    raises (an error, Ctrl-C) the staging folder goes, and ``folder`` keeps what it held:
    never this run's files beside an earlier run's."""
    import shutil

    staging = Path(folder) / f".partial-{name}"
    shutil.rmtree(staging, ignore_errors=True)  # (an interrupted run's)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_staged(staging: Path, folder: str | Path) -> None:
    """Move every file of ``staging`` (see :func:`staged_writes`) to the same place in
    ``folder``, replacing what is there, and remove ``staging``."""
    import os
    import shutil

    for produced in sorted(p for p in staging.rglob("*") if p.is_file()):
        target = Path(folder) / produced.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(produced, target)
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def itk_warnings_off():
    """ITK's warnings (printed to stderr) off inside the block, as they were after it."""
    warned = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warned)


def list_dicom_series(folder: str | Path) -> list[DicomSeries]:
    """All DICOM series in ``folder`` (not recursive), largest first."""
    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    # ITK warns "No Series were found" on stderr, beside our own message on that
    try:
        with itk_warnings_off():
            uids = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        uids = ()
    found = []
    for uid in uids:
        files = tuple(reader.GetGDCMSeriesFileNames(str(folder), uid))
        description, modality = _series_tags(files[0])
        found.append(DicomSeries(uid, files, description, modality))
    return sorted(found, key=lambda s: s.n_slices, reverse=True)


def read_dicom_series(
    folder: str | Path,
    *,
    series_uid: str | None = None,
    name: str | None = None,
    modality: str | None = None,
) -> sitk.Image:
    """Read one DICOM series from a folder: ``series_uid``, else the one with most slices
    among those of ``modality`` (DICOM Modality CT, PT or MR for the families CT, PET, MR)
    when given and present, else among all. When several could be meant, the log names
    the one read and lists the others (read another with ``series_uid``, or from a folder
    of its own).

    Raises:
        ImageReadError: no series in the folder, the UID is not there, reading failed, or
            the slices are not evenly spaced (missing slices, or a variable spacing: read
            as one grid they would put the anatomy in the wrong place).
    """
    folder = Path(folder)
    label = name or str(folder)
    series = list_dicom_series(folder)
    if not series:
        raise ImageReadError(
            f"{label} holds no DICOM series (and is a folder, so it is not a volume file). "
            "Point to the folder that contains the .dcm slices of one series."
        )
    if series_uid is None:
        candidates = series
        wanted = _DICOM_MODALITY.get(modality_family(modality)) if modality else None
        listing = "; ".join(
            f"{s.uid} ({s.modality or 'modality ?'}, {s.description or 'no description'}, "
            f"{s.n_slices} slices)" for s in series)
        if wanted and all(s.modality for s in series) and not any(
                s.modality.upper() == wanted for s in series):
            # every series says what it is, and none is what was asked for: reading one
            # would process, say, a CT as an MR
            raise ImageReadError(
                f"{label} holds no DICOM series of modality {wanted} ({modality} was asked "
                f"for): {listing}. Check the folder or the modality given.")
        if wanted and len(series) > 1:
            candidates = [s for s in series if s.modality.upper() == wanted] or series
        chosen = candidates[0]
        if len(candidates) > 1 or (len(series) > 1 and candidates is series):
            log.warning(
                "%s holds %d DICOM series: %s. Read %s, the largest%s; to read another, give "
                "a folder holding only its files (or, in Python, its series UID: "
                "series_uid=).", label,
                len(series), listing, chosen.uid,
                f" of modality {wanted}" if candidates is not series
                else f" (none is of modality {wanted})" if wanted else "")
        elif len(series) > 1:
            log.info("%s: read DICOM series %s, the only one of modality %s (of %d).", label,
                     chosen.uid, wanted, len(series))
    else:
        matches = [s for s in series if s.uid == series_uid]
        if not matches:
            listing = "; ".join(f"{s.uid} ({s.n_slices} slices)" for s in series)
            raise ImageReadError(
                f"{label} has no DICOM series with UID {series_uid}. Found: {listing}."
            )
        chosen = matches[0]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(chosen.files))
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with itk_warnings_off():  # ITK's non-uniform-sampling warning: checked below, with
            image = reader.Execute()  # a message that says what it means
    except RuntimeError as error:
        raise ImageReadError(
            f"DICOM series {chosen.uid} in {label} could not be read: {_first_line(error)}"
        ) from None
    _check_slice_positions(reader, image, f"DICOM series {chosen.uid} in {label}")
    return image


_DICOM_MODALITY = {"CT": "CT", "PET": "PT", "MR": "MR", "US": "US"}  # family -> (0008,0060)


def _check_slice_positions(reader: sitk.ImageSeriesReader, image: sitk.Image,
                           label: str) -> None:
    """Refuse slices that are not evenly spaced along the slice normal.

    The volume takes one slice spacing (ITK's, from the first slices); a missing slice or a
    variable spacing then puts every later slice in the wrong place. Positions are the
    slices' ImagePositionPatient (0020,0032) projected on the volume's slice axis; a
    series without them is left as read.
    """
    import numpy as np

    count = image.GetSize()[2]
    if count < 3:
        return
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    positions = []
    for index in range(count):
        key = "0020|0032"
        if not reader.HasMetaDataKey(index, key):
            return
        try:
            point = [float(v) for v in reader.GetMetaData(index, key).split("\\")]
        except ValueError:
            return
        if len(point) != 3:
            return
        positions.append(float(np.dot(point, normal)))
    gaps = np.abs(np.diff(positions))
    spacing = float(np.median(gaps))
    tolerance = max(0.01, 0.01 * spacing)  # rounding in the files
    if spacing <= 0 or np.all(np.abs(gaps - spacing) <= tolerance):
        return
    odd = int(np.sum(np.abs(gaps - spacing) > tolerance))
    raise ImageReadError(
        f"{label}: the slices are not evenly spaced (gaps from {gaps.min():.2f} to "
        f"{gaps.max():.2f} mm, {odd} of {len(gaps)} unlike the usual {spacing:.2f} mm): "
        "slices are missing, or the spacing varies. Read as one grid, the anatomy past the "
        "first odd gap would be misplaced. Load it with Slicer's DICOM module (which "
        "regularises the geometry) or complete the series."
    )


def _series_tags(file: str) -> tuple[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return "", ""

    def tag(key: str) -> str:
        return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""

    return tag("0008|103e"), tag("0008|0060")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # ITK messages start with a file:line header; the reason is the last line.
    return lines[-1] if lines else type(error).__name__
